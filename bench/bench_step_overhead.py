"""DINO step overhead: full training step ÷ the bare network work it cannot avoid, measured in one run.

Numerator: mean seconds per step of the real `train()` loop (data loading from the slice store, multi-crop and
intensity augmentation, block masks, student and teacher forward, DINO + iBOT + KoLeo, backward, clipping,
AdamW, teacher EMA, logging). Denominator: student forward + backward on the same crops plus teacher forward on
the global crops, same model and batch, crops made once beforehand. Targets: DINO ≤ 1.10, SimCLR ≤ 1.05.
``--profile`` adds torch.profiler's per-op table of one full step (CPU time, self time, calls).

    python bench/bench_step_overhead.py [--configs dino_vit_tiny_cpu,simclr_vit_tiny_cpu] [--steps 20]
                                        [--store STORE] [--profile]
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
from braindino.train.step import build_networks, multicrop_config
from braindino.train.trainer import train




TRAINED_OUTPUTS = ("dino_global", "dino_local", "ibot", "projection")   # head outputs of DINO and SimCLR students


def bare_network_seconds(config, steps: int) -> float:
    """Mean seconds per step of student fwd+bwd on all crops (+ teacher fwd on the globals for DINO), nothing
    else, over ``steps`` steps after two warm-up steps."""
    student, teacher, _, _ = build_networks(config, torch.device("cpu"))
    batch, crops = config.optim.global_batch_size, config.crops
    n_local = multicrop_config(config).n_local
    global_crops = torch.rand(2 * batch, 1, crops.global_size, crops.global_size)
    local_crops = torch.rand(n_local * batch, 1, crops.local_size, crops.local_size)
    masks = step_masks(ibot_mask_sampler(config), 2 * batch, int(config.seed), 0, 0)
    timings = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        out = student(global_crops, local_crops, masks)
        if teacher is not None:
            teacher(global_crops, masks)
        loss = sum(out[name].mean() for name in TRAINED_OUTPUTS if out.get(name) is not None)
        loss.backward()
        student.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - start)
    return sum(timings[2:]) / steps   # a mean, like the training loop's img/s


TARGETS = {"dino": 1.10, "simclr": 1.05}


def full_step_seconds(config, store: str, run_dir: str) -> float:
    """Seconds per step of the real ``train()`` loop, from its second logging window (warm caches, workers up)."""
    train(config, store, run_dir)
    return config.optim.global_batch_size / read_metrics(run_dir)[-1]["img_per_s_per_device"]


def profile_step(config, store: str, rows: int = 25) -> str:
    """torch.profiler's per-op table (sorted by self CPU time) of three full steps after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    from braindino.store import SliceStore
    from braindino.train.data import StepBatches
    from braindino.train.distributed import DistInfo
    from braindino.train.step import TrainingStep, build_training

    dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    training = build_training(config, dist_info)
    step = TrainingStep(config, training, dist_info)
    batches = StepBatches(SliceStore(store), int(config.optim.global_batch_size), 0, 1, int(config.seed),
                          ibot_mask_sampler(config))
    for i in range(2):
        step(i, batches[i])
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for i in range(2, 5):
            step(i, batches[i])
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="dino_vit_tiny_cpu,simclr_vit_tiny_cpu",
                        help="comma-separated config names or YAML paths")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--store", help="existing slice store (default: synthesise 4 subjects and prepare one)")
    parser.add_argument("--repeats", type=int, default=3, help="(full, bare) pairs measured; the median ratio "
                        "is reported (default 3)")
    parser.add_argument("--profile", action="store_true", help="print the per-op profile of a full step")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store
        if store is None:
            store = f"{tmp}/store"
            if braindino(["synth", "--out", f"{tmp}/cohort", "--subjects", "4", "--sequences", "T1w,FLAIR"]) or \
                    braindino(["prepare", "--manifest", f"{tmp}/cohort/manifest.csv", "--out", store]):
                raise SystemExit("could not build the benchmark's slice store")
        for name in args.configs.split(","):
            config = load_config(name, [f"optim.iters={2 * args.steps}", f"train.log_every={args.steps}",
                                        "train.monitor_every=1000000", "train.checkpoint_every=1000000",
                                        "train.progress=false"])
            pairs = []   # (full, bare) measured alternately: a busy moment of the machine hits one pair only
            for repeat in range(args.repeats):
                pairs.append((full_step_seconds(config, store, f"{tmp}/run-{Path(name).stem}-{repeat}"),
                              bare_network_seconds(config, args.steps)))
            step_seconds, bare_seconds = sorted(pairs, key=lambda pair: pair[0] / pair[1])[len(pairs) // 2]
            objective, target = config.objective, TARGETS[config.objective]
            ratio = step_seconds / bare_seconds
            print(f"config {Path(name).stem}: {config.model.arch}, batch {config.optim.global_batch_size}, "
                  f"2×{config.crops.global_size} + {multicrop_config(config).n_local}×{config.crops.local_size} "
                  f"crops, {torch.get_num_threads()} threads")
            print(f"  full {objective} step      {step_seconds * 1000:8.1f} ms   "
                  f"({config.optim.global_batch_size / step_seconds:.1f} img/s)")
            print(f"  bare network work     {bare_seconds * 1000:8.1f} ms")
            print(f"  overhead ratio        {ratio:8.3f}   (target ≤ {target}; median of "
                  f"{', '.join(f'{full / bare:.3f}' for full, bare in pairs)})")
            if args.profile:
                print(profile_step(config, store))
            print(f"BENCH | {objective.upper() if objective == 'dino' else 'SimCLR'} train step ÷ bare network "
                  f"work ({config.model.arch}, batch {config.optim.global_batch_size}) | {ratio:.3f} "
                  f"({step_seconds:.2f} s/step, {config.optim.global_batch_size / step_seconds:.0f} img/s) | "
                  f"≤ {target}")


if __name__ == "__main__":
    main()
