"""Distributed training against one process: DDP and FSDP2 under real 2-process torchrun, and a 1-process run, at the
same global batch; which slices each rank read; a NaN on one rank; a 1-process resume of a 2-process checkpoint.

The runs use views that do not depend on the rank (full-slice global crops, no flips, rotations, intensity changes,
local crops, iBOT masks, drop path or KoLeo, whose nearest neighbours are per rank), so that 2 processes of 4 images
compute what 1 process of 8 does, up to the order of floating-point sums.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_hooks import NO_INTENSITY, hooks
from conftest import TINY_RECIPE

from braindino.train import checkpoint as ckpt
from braindino.train.config import load_config
from braindino.train.distributed import DistInfo
from braindino.train.metrics_log import read_metrics
from braindino.train.step import build_training
from braindino.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "dino_vit_tiny_cpu.yaml"
TINY = TINY_RECIPE + ["optim.warmup_iters=2", "dino.freeze_last_layer_iters=2", "teacher.temp_warmup_iters=5",
                      "train.log_every=1", "train.monitor_every=5", "optim.base_lr=0.05",
                      "dino.head_batchnorm=false"]   # a BN head normalises over each process's batch: not world-size exact
SAME_VIEWS = ["crops.n_local=0", "crops.global_scale=[1.0,1.0]", "crops.flip_p=0.0", "crops.max_rotation_deg=0.0",
              "ibot.loss_weight=0.0", "koleo.loss_weight=0.0", "model.drop_path_rate=0.0"]
# Clipping off: the clip factor divides by the gradient norm, which DDP sums over whole tensors and FSDP over shards,
# so with clipping the two differ in the last bit (the norms themselves are compared below).
RUN = ["optim.iters=6", "train.checkpoint_every=1", "train.keep_last=10", "optim.clip_grad=1.0e12"]
NAN_CALL = 1          # step 1 gets a NaN loss: on rank 1 only under torchrun
STEPS, LOCAL = 6, 4
# 1 process vs 2: the same sums in another order, which AdamW amplifies where a gradient is near 0. Measured: the
# weights differ by ~3e-5 of how far training moved them (L2 over all tensors); reading other images, a missing
# all-reduce or un-averaged gradients make it of order 1.
RELATIVE = 1e-3


def config(*overrides):
    return load_config(CONFIG, TINY + SAME_VIEWS + RUN + list(overrides))


def torchrun(store, run_dir, *overrides, timeout=240):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "_train_hooks.py"), str(run_dir), "1", str(NAN_CALL),
               "--config", str(CONFIG), "--data", str(store), "--out", str(run_dir), *TINY, *SAME_VIEWS, *RUN,
               *overrides]
    run_dir.mkdir(parents=True)
    result = subprocess.run(command, check=False, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", NO_INTENSITY: "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    return [json.loads((run_dir / f"reads-rank{r}.json").read_text(encoding="utf-8")) for r in range(2)]


def checkpoints(run_dir) -> dict:
    return {int(p.stem.split("-")[1]): ckpt.load_checkpoint(p)
            for p in ckpt.checkpoint_dir(run_dir).glob("step-*.pt")}


@pytest.fixture(scope="module")
def runs(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    out = {"ddp_reads": torchrun(tiny_store, root / "ddp"),
           "fsdp_reads": torchrun(tiny_store, root / "fsdp", "train.distributed=fsdp", "train.knn_label=diagnosis",
                                  "train.knn_every=3")}
    with hooks(nan_calls={NAN_CALL}, no_intensity=True) as reads:
        train(config(), tiny_store, root / "one")
    out["one_reads"] = list(reads)
    # one process continues the 2-process (FSDP) run from its step-3 checkpoint
    resumed = root / "resumed"
    ckpt.checkpoint_dir(resumed).mkdir(parents=True)
    shutil.copy(ckpt.checkpoint_dir(root / "fsdp") / "step-00000003.pt", ckpt.checkpoint_dir(resumed))
    with hooks(no_intensity=True) as reads:
        summary = train(config(), tiny_store, resumed, resume="latest")
    out["resumed_reads"], out["resumed_summary"] = list(reads), summary
    for name in ("ddp", "fsdp", "one", "resumed"):
        out[name] = checkpoints(root / name)
        out[f"{name}_metrics"] = {r["step"]: r for r in read_metrics(root / name)}
    return out


def assert_same_state(a, b, parts=("student", "teacher", "objective"), optimizer=True):
    """Every tensor of every part, and the AdamW state, exactly equal."""
    def check(x, y, what):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        assert torch.equal(x, y), f"{what} differs (max {(x.double() - y.double()).abs().max().item():.3g})"

    for part in parts:
        assert a[part].keys() == b[part].keys(), part
        for name in a[part]:
            check(a[part][name], b[part][name], f"{part}.{name}")
    if not optimizer:
        return
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for parameter in sa:
        assert sa[parameter].keys() == sb[parameter].keys()
        for key in sa[parameter]:
            check(sa[parameter][key], sb[parameter][key], f"optimizer {parameter}.{key}")


def assert_same_trajectory(a, b, start):
    """Student and teacher of ``a`` and ``b`` differ by < RELATIVE of how far ``a`` moved from ``start`` (L2)."""
    def flat(state, part):
        return torch.cat([t.double().flatten() for _, t in sorted(state[part].items()) if t.is_floating_point()])

    for part in ("student", "teacher"):
        moved = (flat(a, part) - flat(start, part)).norm()
        assert moved > 0, part
        difference = (flat(a, part) - flat(b, part)).norm() / moved
        assert difference < RELATIVE, f"{part}: differs by {difference:.3g} of the distance trained"


def test_each_rank_reads_its_own_part_of_the_global_batch(runs):
    """Per step the two ranks read disjoint halves that together are exactly what 1 process read at that step."""
    one = runs["one_reads"]
    assert len(one) == STEPS * 2 * LOCAL and len(set(one)) == len(one)    # one pass: no slice twice
    for name in ("ddp_reads", "fsdp_reads"):
        rank0, rank1 = runs[name]
        assert len(rank0) == len(rank1) == STEPS * LOCAL, name
        for step in range(STEPS):
            part0, part1 = (r[step * LOCAL:(step + 1) * LOCAL] for r in (rank0, rank1))
            assert not set(part0) & set(part1), (name, step, part0, part1)
            assert sorted(part0 + part1) == sorted(one[step * 2 * LOCAL:(step + 1) * 2 * LOCAL]), (name, step)
    # the 1-process resume from step 3 reads what the uninterrupted run read at steps 3..5
    assert runs["resumed_reads"] == one[3 * 2 * LOCAL:]


def test_ddp_and_fsdp_agree_exactly_at_every_step(runs):
    for step in range(1, STEPS + 1):
        assert runs["ddp"][step]["next_step"] == runs["fsdp"][step]["next_step"] == step
        assert_same_state(runs["ddp"][step], runs["fsdp"][step])
    for step in range(STEPS):
        ddp, fsdp = runs["ddp_metrics"][step], runs["fsdp_metrics"][step]
        assert ddp["loss/total"] == fsdp["loss/total"] and ddp.get("lr") == fsdp.get("lr"), step
        if step != NAN_CALL:   # the norm of all gradients, not of this rank's shard
            assert ddp["grad_norm"] == pytest.approx(fsdp["grad_norm"], rel=1e-6, abs=0), step
            assert ddp["grad_norm"] == pytest.approx(runs["one_metrics"][step]["grad_norm"], rel=1e-5, abs=0), step
    knn = [r["monitor/knn_accuracy"] for r in runs["fsdp_metrics"].values() if "monitor/knn_accuracy" in r]
    assert len(knn) == 2 and all(0.0 <= value <= 1.0 for value in knn)   # kNN runs through sharded networks


def test_two_processes_compute_what_one_process_does(runs):
    """Same global batch, same weights: DDP and FSDP end where the 1-process run ends, step by step."""
    one = runs["one"]
    for step in range(1, 3):     # step 0 runs at lr 0 and step 1 is skipped: nothing moved yet
        assert_same_state(runs["ddp"][step], one[step], parts=("student", "teacher"), optimizer=False)
    for step in range(3, STEPS + 1):
        assert_same_trajectory(one[step], runs["ddp"][step], start=one[1])
    assert_same_trajectory(one[STEPS], runs["fsdp"][STEPS], start=one[1])


def test_a_nan_on_one_rank_is_skipped_by_every_rank(runs):
    """Rank 1's loss is NaN at step 1; rank 0's is finite, yet both skip the step and change nothing."""
    for name in ("ddp", "fsdp", "one"):
        record = runs[f"{name}_metrics"][NAN_CALL]
        assert record.get("skipped_nonfinite") == 1, name
        if name != "one":
            assert math.isfinite(record["loss/total"]), "rank 0's own loss was finite"
        assert all("skipped_nonfinite" not in runs[f"{name}_metrics"][s] for s in range(STEPS) if s != NAN_CALL)
        before, after = runs[name][NAN_CALL], runs[name][NAN_CALL + 1]
        assert after["next_step"] == before["next_step"] + 1
        assert_same_state(before, after)
        trained = runs[name][NAN_CALL + 2]["student"]
        assert any(not torch.equal(trained[k], after["student"][k]) for k in trained)   # the next step trains


def test_one_process_resumes_a_two_process_checkpoint(runs, tiny_store):
    saved = runs["fsdp"][3]
    # restored at world size 1, the training state is the checkpoint, tensor for tensor
    training = build_training(config(), DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert ckpt.restore_training_state(saved, training.student, training.teacher, training.optimizer,
                                       training.objective) == 3
    restored = ckpt.gather_training_state(training.student, training.teacher, training.optimizer,
                                          training.objective, 3)
    assert_same_state(saved, restored)
    for group, back in zip(saved["optimizer"]["param_groups"], restored["optimizer"]["param_groups"], strict=True):
        assert {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()} == \
               {k: list(v) if isinstance(v, tuple) else v for k, v in back.items()}
    # and it continues as the uninterrupted runs did, on 1 process or 2
    assert runs["resumed_summary"]["steps_run"] == 3 and runs["resumed_summary"]["world_size"] == 1
    assert_same_trajectory(runs["resumed"][STEPS], runs["one"][STEPS], start=saved)
    assert_same_trajectory(runs["resumed"][STEPS], runs["fsdp"][STEPS], start=saved)
