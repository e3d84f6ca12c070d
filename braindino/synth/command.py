"""``braindino synth``: write the synthetic brain-MRI cohort (NIfTI images, tumour masks, manifest.csv)."""

import argparse
import sys
import time

from braindino.cli import positive_int
from braindino.errors import InputError
from braindino.synth.cohort import generate_cohort
from braindino.synth.sequences import SEQUENCES


def _resolution(text: str) -> float:
    value = float(text)
    if not 1.0 <= value <= 6.0:
        raise argparse.ArgumentTypeError(f"must be between 1 and 6 mm, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the cohort into (created if missing)")
    parser.add_argument("--subjects", type=positive_int, default=24, help="number of subjects (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give identical images")
    parser.add_argument("--resolution", type=_resolution, default=1.0,
                        help="isotropic voxel size in mm, 1-6 (default 1: the MNI152 template grid)")
    parser.add_argument("--sequences", nargs="+", choices=SEQUENCES, default=list(SEQUENCES),
                        help="sequences to write per subject (default: all four)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="worker processes (results do not depend on it)")
    parser.add_argument("--skull-stripped", action="store_true",
                        help="brain-only images on a zero background (BraTS-like) instead of head with skull, "
                             "scalp and a noisy background")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        manifest = generate_cohort(args.out, n_subjects=args.subjects, seed=args.seed,
                                   resolution_mm=args.resolution, sequences=args.sequences, workers=args.workers,
                                   skull_stripped=args.skull_stripped, progress=True)
    except InputError as err:
        print(f"braindino synth: {err}", file=sys.stderr)
        return 2
    subjects = manifest.drop_duplicates("subject")
    counts = ", ".join(f"{name} {count}" for name, count in subjects["diagnosis"].value_counts().sort_index().items())
    print(f"synth: {len(subjects)} subjects ({counts}), {len(manifest)} volumes at {args.resolution:g} mm in "
          f"{time.perf_counter() - started:.1f} s -> {args.out}/manifest.csv")
    return 0
