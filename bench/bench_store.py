"""Slice-store benchmark: random slice reads from a prepared store versus per-sample NIfTI loading.

Measured in one run, on one machine:
  (a) ``SliceStore`` random reads, one process, warm page cache: slices/s;
  (b) the per-sample baseline of MONAI/TorchIO-style pipelines: for each random slice, open the ``.nii.gz`` with
      nibabel and take the axial slice (through nibabel's array proxy, which decompresses only up to that slice,
      so this baseline is charitable: no resampling or normalisation is done for it);
  (c) ``prepare_store`` throughput with ``--workers`` processes: volumes/s.
Targets: (a) >= 20,000 slices/s per core and (a)/(b) >= 200.

Without ``--store`` it writes the synthetic cohort (``braindino.synth``: one 1 mm T1w int16 ``.nii.gz`` per subject
on the 197 x 233 x 189 MNI152 grid) and prepares a store from it, in a temporary folder. ``--store`` benchmarks an
existing store instead (reads and baseline only; its volumes' files must still exist).

    python bench/bench_store.py [--subjects 8] [--workers N] [--reads 20000] [--baseline-reads 50]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from braindino.ingest.preprocess import PreprocessConfig
from braindino.store import SliceStore, prepare_store
from braindino.synth.cohort import generate_cohort

TARGET_SLICES_PER_S = 20_000
TARGET_RATIO = 200


def store_reads_per_second(store: SliceStore, n_reads: int, rng: np.random.Generator) -> float:
    """Random ``store[i]`` reads per second, after one pass over the store has warmed the page cache."""
    for i in range(len(store)):
        store[i]
    indices = rng.integers(0, len(store), size=n_reads)
    started = time.perf_counter()
    for i in indices:
        store[int(i)]
    return n_reads / (time.perf_counter() - started)


def per_sample_reads_per_second(store: SliceStore, n_reads: int, rng: np.random.Generator) -> float:
    """Random slices per second when each one is read from its NIfTI file, as a per-sample loader does."""
    slice_indices = rng.integers(0, len(store), size=n_reads)
    started = time.perf_counter()
    for i in slice_indices:
        volume = int(store.slice_volume[i])
        image = nib.load(store.volumes["path"].iat[volume])
        np.asarray(image.dataobj[:, :, int(store.slice_z[i])], dtype=np.float32)
    return n_reads / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", help="benchmark this existing store (skips cohort and prepare)")
    parser.add_argument("--subjects", type=int, default=8, help="synthetic subjects (one T1w each, default 8)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="prepare worker processes (default: all usable cores)")
    parser.add_argument("--size", type=int, default=224, help="slice size of the prepared store (default 224)")
    parser.add_argument("--reads", type=int, default=20_000, help="random store reads timed (default 20000)")
    parser.add_argument("--baseline-reads", type=int, default=50, help="per-sample NIfTI reads timed (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory(prefix="bench_store_") as work:
        prepare_line = "skipped (--store given)"
        store_dir = args.store
        if store_dir is None:
            started = time.perf_counter()
            generate_cohort(Path(work) / "cohort", n_subjects=args.subjects, seed=args.seed, resolution_mm=1.0,
                            sequences=("T1w",), workers=args.workers)
            print(f"synthesised {args.subjects} T1w volumes in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
            manifest = Path(work) / "cohort" / "manifest.csv"
            store_dir = Path(work) / "store"
            report = prepare_store(manifest, store_dir, PreprocessConfig(size=args.size), workers=args.workers)
            if not report.ok:
                print(f"prepare failed: {report.errors}", file=sys.stderr)
                return 1
            prepare_line = (f"{report.stored / report.seconds:.2f} volumes/s ({args.workers} workers, "
                            f"{report.slices_written} slices in {report.seconds:.1f} s)")
        store = SliceStore(store_dir)
        store_rate = store_reads_per_second(store, args.reads, rng)
        baseline_rate = per_sample_reads_per_second(store, args.baseline_reads, rng)

    ratio = store_rate / baseline_rate
    rows = [("(a) SliceStore random read, 1 process", f"{store_rate:,.0f} slices/s",
             "ok" if store_rate >= TARGET_SLICES_PER_S else f"below {TARGET_SLICES_PER_S:,}"),
            ("(b) per-sample nibabel .nii.gz + slice", f"{baseline_rate:,.1f} slices/s", ""),
            ("(a) / (b)", f"{ratio:,.0f}x", "ok" if ratio >= TARGET_RATIO else f"below {TARGET_RATIO}x"),
            ("(c) prepare", prepare_line, "")]
    print(f"store: {len(store)} slices of {store.height}x{store.width} float16 from {len(store.volumes)} volumes")
    for name, value, verdict in rows:
        print(f"{name:<42} {value:<50} {verdict}")
    print(f"BENCH | slice store random reads, 1 process | {store_rate:,.0f} slices/s | ≥ {TARGET_SLICES_PER_S:,}")
    print(f"BENCH | slice store ÷ per-sample NIfTI loader | {ratio:,.0f}× | ≥ {TARGET_RATIO}×")
    if args.store is None:
        print(f"BENCH | prepare ({args.workers} workers, {args.size}² slices) | "
              f"{report.stored / report.seconds:.2f} volumes/s | —")
    return 0


if __name__ == "__main__":
    sys.exit(main())
