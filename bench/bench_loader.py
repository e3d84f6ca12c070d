"""Loader benchmark: what one data-loader worker delivers to pretraining, against what 1,000 img/s needs.

Measured in one run, in one process (= one ``DataLoader`` worker), warm page cache:
  (a) ``StepBatches`` items of a config (slice reads from the store + the step's iBOT masks with their gather
      indices and loss weights): slices/s per worker;
  (b) the same without masks (reads only), and the masks alone (ms per step);
  (c) workers per GPU needed for ``--target`` img/s (default 1,000: the ViT-B/16 H200 goal), and the ratio of one
      worker's rate to that target.

Without ``--store`` it writes 4 synthetic subjects and prepares a store at the config's global crop size (224 for
``dino_vit_base``) in a temporary folder.

    python bench/bench_loader.py [--config dino_vit_base] [--store STORE] [--steps 20] [--target 1000]
"""

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

from braindino.ingest.preprocess import PreprocessConfig
from braindino.store import SliceStore, prepare_store
from braindino.synth.cohort import generate_cohort
from braindino.train.config import load_config
from braindino.train.data import StepBatches, ibot_mask_sampler, step_masks


def items_per_second(dataset, steps: int) -> float:
    dataset[0]   # open the store's memory maps
    started = time.perf_counter()
    for step in range(1, steps + 1):
        dataset[step]
    return steps / (time.perf_counter() - started)


def masks_seconds(config, n_images: int, steps: int) -> float:
    sampler = ibot_mask_sampler(config)
    started = time.perf_counter()
    for step in range(steps):
        step_masks(sampler, n_images, int(config.seed), step, 0)
    return (time.perf_counter() - started) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="dino_vit_base")
    parser.add_argument("--store", help="an existing slice store (default: prepare a small synthetic one)")
    parser.add_argument("--local-batch", type=int, default=64, help="slices per step per GPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--target", type=float, default=1000.0, help="img/s per GPU the loader must sustain")
    args = parser.parse_args(argv)
    config = load_config(args.config, [])
    with tempfile.TemporaryDirectory() as scratch:
        store_path = args.store
        if store_path is None:
            generate_cohort(Path(scratch) / "cohort", n_subjects=4, seed=0)
            store_path = Path(scratch) / "store"
            prepare_store(Path(scratch) / "cohort" / "manifest.csv", store_path,
                          PreprocessConfig(size=int(config.crops.global_size)), progress=False)
        store = SliceStore(store_path)
        batch, seed = args.local_batch, int(config.seed)
        with_masks = StepBatches(store, batch, 0, 1, seed, ibot_mask_sampler(config))
        reads_only = StepBatches(store, batch, 0, 1, seed, None)
        full_rate = items_per_second(with_masks, args.steps) * batch
        read_rate = items_per_second(reads_only, args.steps) * batch
        mask_ms = masks_seconds(config, 2 * batch, args.steps) * 1e3
        slice_shape = tuple(store[0].shape)
    workers = math.ceil(args.target / full_rate)
    print(f"config {args.config}: local batch {batch} slices of {slice_shape}, masks for {2 * batch} global crops "
          f"on a {int(config.crops.global_size) // int(config.model.patch_size)}² grid")
    print(f"| measure | value |\n|---|---|\n"
          f"| slices/s per worker, reads + masks | {full_rate:,.0f} |\n"
          f"| slices/s per worker, reads only | {read_rate:,.0f} |\n"
          f"| masks per step (ms) | {mask_ms:.1f} |\n"
          f"| one worker ÷ {args.target:,.0f} img/s | {full_rate / args.target:.2f} |\n"
          f"| workers per GPU for {args.target:,.0f} img/s | {workers} |")
    print(f"BENCH | loader slices/s per worker (reads + iBOT masks, {slice_shape[0]}² slices) | {full_rate:,.0f} | —")
    print(f"BENCH | one loader worker ÷ {args.target:,.0f} img/s | {full_rate / args.target:.2f} | ≥ 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
