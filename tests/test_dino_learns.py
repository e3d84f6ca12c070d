"""The shipped CPU DINO recipe leaves the uniform-target fixed point on a real (synthetic-anatomy) slice store, and
the recipe it replaced does not: the regression test of the fixed-point study (README, "Why DINO sat at log K").

Both runs are the shipped ``dino_vit_tiny_cpu`` config, shrunk only in size (48 px crops, patch 8, 1,024
prototypes, 60 steps); the old recipe adds back what the study changed (teacher temperature warmed 0.04 → 0.07,
momentum annealed 0.99 → 1 inside the run, 4 local crops, global crops from 32 % of the slice, no head BatchNorm,
20 frozen steps). At the fixed point Sinkhorn's targets are near-uniform: the DINO loss stays near log K and the
teacher's logits differ across slices by about one teacher temperature.
"""

import math
from pathlib import Path

import numpy as np
import pytest

from braindino.train.config import load_config
from braindino.train.metrics_log import read_metrics
from braindino.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
PROTOTYPES = 1024
SMALL = ["model.patch_size=8", "crops.global_size=48", "crops.local_size=24", "optim.global_batch_size=16",
         f"dino.n_prototypes={PROTOTYPES}", f"ibot.n_prototypes={PROTOTYPES}", "dino.head_hidden_dim=256",
         "dino.head_bottleneck_dim=64", "optim.iters=60", "optim.warmup_iters=10", "train.num_workers=0",
         "train.progress=false", "train.log_every=10", "train.monitor_every=10", "train.checkpoint_every=1000"]
OLD_RECIPE = ["teacher.temp=0.07", "teacher.temp_warmup_start=0.04", "teacher.temp_warmup_iters=100",
              "teacher.momentum=0.99", "teacher.momentum_end=1.0", "crops.n_local=4", "crops.global_scale=[0.32,1.0]",
              "dino.head_batchnorm=false", "dino.freeze_last_layer_iters=20"]


@pytest.fixture(scope="module")
def anatomy_store(tmp_path_factory):
    """4 synthetic subjects (MNI anatomy, 4 sequences, 3 mm) in a 64 × 64 slice store: ~900 slices."""
    from braindino.cli import main

    root = tmp_path_factory.mktemp("anatomy")
    assert main(["synth", "--out", str(root / "cohort"), "--subjects", "4", "--seed", "0", "--resolution", "3",
                 "--workers", "0"]) == 0
    assert main(["prepare", "--manifest", str(root / "cohort" / "manifest.csv"), "--out", str(root / "store"),
                 "--size", "64", "--spacing", "3", "--workers", "0"]) == 0
    return root / "store"


def _last_logs(store, out, overrides):
    config = load_config(ROOT / "configs" / "dino_vit_tiny_cpu.yaml", SMALL + overrides)
    train(config, store, out)
    records = read_metrics(out)
    losses = [r["loss/dino"] for r in records if "loss/dino" in r]
    monitored = [r for r in records if "monitor/teacher_logit_spread_over_temp" in r][-3:]
    return (float(np.mean(losses[-3:])),
            float(np.mean([r["monitor/teacher_logit_spread_over_temp"] for r in monitored])),
            float(np.mean([r["monitor/teacher_entropy"] for r in monitored])))


@pytest.mark.parametrize("recipe", ["shipped", "old"])
def test_shipped_cpu_recipe_leaves_log_k_and_the_old_one_stays(anatomy_store, tmp_path, recipe):
    loss, spread, entropy = _last_logs(anatomy_store, tmp_path / "run", [] if recipe == "shipped" else OLD_RECIPE)
    # Over the last 30 steps (log K = 6.93), measured: shipped loss 6.77, spread 5.2 teacher temperatures, target
    # entropy 5.4; old 6.85, spread 0.8-1.2, entropy 6.6-6.7.
    log_k = math.log(PROTOTYPES)
    left = loss < log_k - 0.1 and spread > 3.0 and entropy < log_k - 1.0
    assert left == (recipe == "shipped"), (recipe, loss, spread, entropy)
