"""Slice-store benchmark: random slice reads from a prepared store versus per-sample NIfTI loading.

Measured in one run, on one machine:
  (a) ``SliceStore.read_slices`` of random batches of 64 (what the training loader reads per step), one process,
      warm page cache: slices/s, side by side with (m) a plain memory-mapped *copy* ``np.array(mm[row])`` of each
      of the same slices from the same shards (no checks, no stacking into a batch: what a reader without SIGBUS
      and NaN safety would do),
      and with ``store[i]`` one slice at a time;
  (b) the per-sample baseline of MONAI/TorchIO-style pipelines: for each random slice, open the ``.nii.gz`` with
      nibabel and take the axial slice (through nibabel's array proxy, which decompresses only up to that slice,
      so this baseline is charitable: no resampling or normalisation is done for it);
  (c) ``prepare_store`` throughput with ``--workers`` processes: volumes/s.
Targets: (a) >= 20,000 slices/s per core, (a)/(m) >= 0.9 and (a)/(b) >= 200.

Without ``--store`` it writes the synthetic cohort (``braindino.synth``: one 1 mm T1w int16 ``.nii.gz`` per subject
on the 197 x 233 x 189 MNI152 grid) and prepares a store from it, in a temporary folder. ``--store`` benchmarks an
existing store instead (reads and baseline only; its volumes' files must still exist).

    python bench/bench_store.py [--subjects 8] [--workers N] [--reads 20000] [--baseline-reads 50]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from braindino.ingest.preprocess import PreprocessConfig
from braindino.store import SliceStore, prepare_store
from braindino.store.reader import _all_finite
from braindino.synth.cohort import generate_cohort

TARGET_SLICES_PER_S = 20_000
TARGET_RATIO = 200
TARGET_MMAP_RATIO = 0.9


def shard_maps(store: SliceStore) -> tuple[list[np.memmap], np.ndarray, np.ndarray]:
    """Every shard memory-mapped as ``[rows, H, W]``, and each global slice's (shard, row) — the layout of
    ``braindino.store.format``, read directly, for the unchecked memory-map baseline."""
    meta = json.loads((store.root / "store.json").read_text(encoding="utf-8"))
    maps = [np.memmap(store.root / entry["file"], dtype=np.float16, mode="r",   # plain views: no subclass overhead
                      shape=(int(entry["n_slices"]), store.height, store.width)).view(np.ndarray)
            for entry in meta["shards"]]
    volumes = store.volumes
    volume = np.asarray(store.slice_volume, dtype=np.int64)
    first = volumes["first_slice"].to_numpy(np.int64)[volume]
    rows = volumes["shard_start"].to_numpy(np.int64)[volume] + np.arange(len(store)) - first
    return maps, volumes["shard"].to_numpy(np.int64)[volume], rows


def random_read_rates(store: SliceStore, n_reads: int, batch: int, rng: np.random.Generator,
                      rounds: int = 5) -> dict[str, float]:
    """Slices/s of (batched reads, one-at-a-time reads, unchecked memory-map copies) of the same random slices,
    after one pass has warmed the page cache; the rounds interleave the three readers and each keeps its best."""
    maps, shard_of, row_of = shard_maps(store)
    for i in range(0, len(store), batch):
        store.read_slices(np.arange(i, min(i + batch, len(store))))
    for i in range(len(store)):
        np.array(maps[shard_of[i]][row_of[i]])
    batches = rng.integers(0, len(store), size=(max(n_reads // batch, 1), batch))
    def batched():
        for indices in batches:
            store.read_slices(indices)

    def single():
        for i in batches.reshape(-1):
            store[int(i)]

    def mmap_copy():
        for i in batches.reshape(-1):
            np.array(maps[shard_of[i]][row_of[i]])

    sample = store.read_slices(batches[0])

    def finite_check_only():   # the share of (a) spent checking for NaN/Inf: every batch's bytes read once more
        for _ in batches:
            _all_finite(sample)

    readers = {"batched": batched, "single": single, "mmap copy": mmap_copy,   # results dropped as they come
               "NaN/Inf check": finite_check_only}
    best = dict.fromkeys(readers, 0.0)
    for _ in range(rounds):
        for name, read in readers.items():
            started = time.perf_counter()
            read()
            best[name] = max(best[name], batches.size / (time.perf_counter() - started))
    return best


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
    parser.add_argument("--batch", type=int, default=64, help="slices per batched read (default 64)")
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
        rates = random_read_rates(store, args.reads, args.batch, rng)
        baseline_rate = per_sample_reads_per_second(store, args.baseline_reads, rng)

    store_rate = rates["batched"]
    ratio, mmap_ratio = store_rate / baseline_rate, store_rate / rates["mmap copy"]
    unchecked_ratio = 1 / (1 / store_rate - 1 / rates["NaN/Inf check"]) / rates["mmap copy"]
    rows = [(f"(a) SliceStore.read_slices, batches of {args.batch}", f"{store_rate:,.0f} slices/s",
             "ok" if store_rate >= TARGET_SLICES_PER_S else f"below {TARGET_SLICES_PER_S:,}"),
            ("    store[i], one slice at a time", f"{rates['single']:,.0f} slices/s", ""),
            ("(m) np.array(memmap[row]), same slices", f"{rates['mmap copy']:,.0f} slices/s", ""),
            ("(a) / (m)", f"{mmap_ratio:.2f}x", "ok" if mmap_ratio >= TARGET_MMAP_RATIO else
             f"below {TARGET_MMAP_RATIO}x"),
            ("    of (a): the NaN/Inf check", f"{1e6 / rates['NaN/Inf check']:.2f} µs of {1e6 / store_rate:.2f} µs "
             f"per slice", ""),
            ("(a) without the NaN/Inf check / (m)", f"{unchecked_ratio:.2f}x", ""),
            ("(b) per-sample nibabel .nii.gz + slice", f"{baseline_rate:,.1f} slices/s", ""),
            ("(a) / (b)", f"{ratio:,.0f}x", "ok" if ratio >= TARGET_RATIO else f"below {TARGET_RATIO}x"),
            ("(c) prepare", prepare_line, "")]
    print(f"store: {len(store)} slices of {store.height}x{store.width} float16 from {len(store.volumes)} volumes")
    for name, value, verdict in rows:
        print(f"{name:<42} {value:<50} {verdict}")
    print(f"BENCH | slice store random reads, 1 process, batches of {args.batch} | {store_rate:,.0f} slices/s | "
          f"≥ {TARGET_SLICES_PER_S:,}")
    print(f"BENCH | slice store ÷ unchecked memory-map copy of the same slices | {mmap_ratio:.2f} "
          f"({unchecked_ratio:.2f} without the NaN/Inf check) | ≥ {TARGET_MMAP_RATIO}")
    print(f"BENCH | slice store ÷ per-sample NIfTI loader | {ratio:,.0f}× | ≥ {TARGET_RATIO}×")
    if args.store is None:
        print(f"BENCH | prepare ({args.workers} workers, {args.size}² slices) | "
              f"{report.stored / report.seconds:.2f} volumes/s | —")
    return 0


if __name__ == "__main__":
    sys.exit(main())
