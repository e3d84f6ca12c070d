"""``braindino demo``: the main job end to end on the embedded synthetic cohort, on whatever machine this is.

synth (NIfTI cohort from the MNI152 template) → prepare (slice store) → pretrain (ViT-Tiny DINO + iBOT + KoLeo)
→ a summary of each stage. Every stage writes its own folder under ``--out`` and can be rerun on its own.
"""

import argparse
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dino_vit_tiny_cpu.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo", help="folder for the cohort, the slice store and the run")
    parser.add_argument("--subjects", type=int, default=16, help="synthetic subjects (4 sequences each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=float, default=1.0, help="voxel size of the synthetic volumes in mm")
    parser.add_argument("--iters", type=int, default=300, help="pretraining steps")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for synth and prepare")
    parser.add_argument("--config", default=str(CONFIG), help="pretraining config (default: ViT-Tiny on CPU)")


def run(args: argparse.Namespace) -> int:
    from braindino.cli import main as braindino

    out = Path(args.out)
    cohort, store, run_dir = out / "cohort", out / "store", out / "run"
    started = time.perf_counter()
    print(f"[1/3] synthesising {args.subjects} subjects into {cohort}")
    status = braindino(["synth", "--out", str(cohort), "--subjects", str(args.subjects), "--seed", str(args.seed),
                        "--resolution", str(args.resolution), "--workers", str(args.workers)])
    if status:
        return status
    print(f"[2/3] preparing the slice store {store}")
    status = braindino(["prepare", "--manifest", str(cohort / "manifest.csv"), "--out", str(store),
                        "--workers", str(args.workers)])
    if status:
        return status
    print(f"[3/3] pretraining ({Path(args.config).name}, {args.iters} steps) into {run_dir}")
    train_args = ["train", "--config", args.config, "--data", str(store), "--out", str(run_dir),
                  f"optim.iters={args.iters}", f"seed={args.seed}", "train.knn_label=sequence",
                  f"train.knn_every={max(args.iters // 3, 1)}"]
    if (run_dir / "checkpoints").exists():
        train_args.append("--resume")
    status = braindino(train_args)
    if status:
        return status
    print(demo_summary(run_dir, time.perf_counter() - started))
    return 0


def demo_summary(run_dir: Path, seconds: float) -> str:
    """One line per monitor: loss and collapse indicators at the start and end of pretraining."""
    from braindino.train.metrics_log import read_metrics

    records = read_metrics(run_dir)
    monitored = [r for r in records if "monitor/effective_rank" in r]
    losses = [r["loss/total"] for r in records if "loss/total" in r]
    lines = [f"demo finished in {seconds:.0f}s; run: {run_dir}"]
    if losses:
        lines.append(f"  loss (total): {losses[0]:.4f} at the first log -> {losses[-1]:.4f} at the last")
    if monitored:
        first, last = monitored[0], monitored[-1]
        for key in ("effective_rank", "feature_std", "student_teacher_kl", "teacher_entropy", "prototype_usage"):
            if f"monitor/{key}" in last:
                lines.append(f"  {key}: {first[f'monitor/{key}']:.4f} at step {first['step'] + 1} -> "
                             f"{last[f'monitor/{key}']:.4f} at step {last['step'] + 1}")
    knn = [r for r in records if "monitor/knn_accuracy" in r]
    initial = [r["monitor/knn_accuracy_init"] for r in records if "monitor/knn_accuracy_init" in r]
    if knn and initial:
        lines.append(f"  kNN accuracy of the MRI sequence on held-out volumes: {initial[0]:.3f} with random weights "
                     f"-> {knn[-1]['monitor/knn_accuracy']:.3f} after pretraining")
    return "\n".join(lines)
