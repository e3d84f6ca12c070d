"""DINO step overhead: full training step ÷ the bare network work it cannot avoid, measured in one run.

Numerator: seconds per step of the real `train()` loop (data loading from the slice store, multi-crop and
intensity augmentation, block masks, student and teacher forward, DINO + iBOT + KoLeo, backward, clipping,
AdamW, teacher EMA, logging). Denominator: student forward + backward on the same crops plus teacher forward on
the global crops, same model and batch, crops made once beforehand. Target: ≤ 1.15.

    python bench/bench_step_overhead.py [--config configs/dino_vit_tiny_cpu.yaml] [--steps 20] [--store STORE]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from braindino.cli import main as braindino
from braindino.train.config import load_config
from braindino.train.data import ibot_mask_sampler, step_masks
from braindino.train.metrics_log import read_metrics
from braindino.train.step import build_networks
from braindino.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def bare_network_seconds(config, steps: int) -> float:
    """Seconds per step of student fwd+bwd on all crops + teacher fwd on the globals, nothing else."""
    student, teacher, _, _ = build_networks(config, torch.device("cpu"))
    batch, crops = config.optim.global_batch_size, config.crops
    global_crops = torch.rand(2 * batch, 1, crops.global_size, crops.global_size)
    local_crops = torch.rand(crops.n_local * batch, 1, crops.local_size, crops.local_size)
    masks = step_masks(ibot_mask_sampler(config), 2 * batch, int(config.seed), 0, 0)
    timings = []
    for _ in range(steps + 3):
        start = time.perf_counter()
        out = student(global_crops, local_crops, masks)
        teacher(global_crops, masks)
        loss = out["dino_global"].mean() + out["dino_local"].mean() + out["ibot"].mean()
        loss.backward()
        student.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - start)
    return sorted(timings[3:])[len(timings[3:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "dino_vit_tiny_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--store", help="existing slice store (default: synthesise 4 subjects and prepare one)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store
        if store is None:
            store = f"{tmp}/store"
            if braindino(["synth", "--out", f"{tmp}/cohort", "--subjects", "4", "--sequences", "T1w", "FLAIR"]) or \
                    braindino(["prepare", "--manifest", f"{tmp}/cohort/manifest.csv", "--out", store]):
                raise SystemExit("could not build the benchmark's slice store")
        config = load_config(args.config, [f"optim.iters={2 * args.steps}", f"train.log_every={args.steps}",
                                           "train.monitor_every=1000000", "train.checkpoint_every=1000000",
                                           "train.progress=false"])
        train(config, store, f"{tmp}/run")
        timed = read_metrics(f"{tmp}/run")[-1]       # second window: warm caches, workers running
        step_seconds = config.optim.global_batch_size / timed["img_per_s_per_device"]
    bare_seconds = bare_network_seconds(config, args.steps)
    print(f"config {Path(args.config).name}: {config.model.arch}, batch {config.optim.global_batch_size}, "
          f"2×{config.crops.global_size} + {config.crops.n_local}×{config.crops.local_size} crops, "
          f"{torch.get_num_threads()} threads")
    print(f"full DINO step        {step_seconds * 1000:8.1f} ms")
    print(f"bare network work     {bare_seconds * 1000:8.1f} ms")
    print(f"overhead ratio        {step_seconds / bare_seconds:8.3f}   (target ≤ 1.15)")
    print(f"BENCH | DINO train step ÷ bare network work ({config.model.arch}, batch "
          f"{config.optim.global_batch_size}) | {step_seconds / bare_seconds:.3f} | ≤ 1.15")


if __name__ == "__main__":
    main()
