"""``braindino synth``: write the synthetic brain-MRI cohort (NIfTI images, tumour masks, manifest.csv)
(:func:`braindino.synth.cohort.generate_cohort`)."""

import argparse
import time

from braindino.cli.arguments import add_out, add_workers, comma_list, positive_int
from braindino.synth.sequences import SEQUENCES


def _resolution(text: str) -> float:
    value = float(text)
    if not 1.0 <= value <= 6.0:
        raise argparse.ArgumentTypeError(f"must be between 1 and 6 mm, got {value}")
    return value


def _sequences(text: str) -> list[str]:
    names = comma_list()(text)
    unknown = [name for name in names if name not in SEQUENCES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose among {','.join(SEQUENCES)}")
    return names


def add_arguments(parser) -> None:
    add_out(parser, "DIR", "folder to write the cohort into (created if missing)")
    parser.add_argument("--subjects", type=positive_int, default=24, help="number of subjects (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give identical images")
    parser.add_argument("--resolution", type=_resolution, default=1.0,
                        help="isotropic voxel size in mm, 1-6 (default 1: the MNI152 template grid)")
    parser.add_argument("--sequences", type=_sequences, default=list(SEQUENCES), metavar="LIST",
                        help=f"comma-separated sequences to write per subject (default: {','.join(SEQUENCES)})")
    add_workers(parser)
    parser.add_argument("--skull-stripped", action="store_true",
                        help="brain-only images on a zero background (BraTS-like) instead of head with skull, "
                             "scalp and a noisy background")


def run(args) -> int:
    from braindino.synth.cohort import generate_cohort

    started = time.perf_counter()
    manifest = generate_cohort(args.out, n_subjects=args.subjects, seed=args.seed, resolution_mm=args.resolution,
                               sequences=args.sequences, workers=max(1, args.workers),
                               skull_stripped=args.skull_stripped, progress=True)
    subjects = manifest.drop_duplicates("subject")
    counts = ", ".join(f"{name} {count}" for name, count in subjects["diagnosis"].value_counts().sort_index().items())
    print(f"synth: {len(subjects)} subjects ({counts}), {len(manifest)} volumes at {args.resolution:g} mm in "
          f"{time.perf_counter() - started:.1f} s -> {args.out}/manifest.csv")
    return 0
