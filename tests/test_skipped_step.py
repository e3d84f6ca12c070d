"""A step whose loss is NaN/Inf changes nothing, part by part; a checkpoint holding NaN/Inf weights is never written."""

import math

import pytest
import torch
from _train_hooks import hooks
from test_train import CONFIG, TINY

from braindino.train import checkpoint as ckpt
from braindino.train.config import load_config
from braindino.train.metrics_log import read_metrics
from braindino.train.trainer import train

SKIPPED = 3   # step 3's loss is NaN


@pytest.fixture(scope="module")
def skipped_run(tiny_store, tmp_path_factory):
    """Centering mode (teacher centres move every step) with iBOT on; a checkpoint after every step."""
    run_dir = tmp_path_factory.mktemp("skipped") / "run"
    config = load_config(CONFIG, TINY + ["optim.iters=5", "dino.teacher_target=centering", "train.checkpoint_every=1",
                                         "train.keep_last=10", "dino.freeze_last_layer_iters=1"])
    with hooks(nan_calls={SKIPPED}):
        train(config, tiny_store, run_dir)
    states = {int(p.stem.split("-")[1]): ckpt.load_checkpoint(p) for p in ckpt.checkpoint_dir(run_dir).glob("*.pt")}
    return states, {r["step"]: r for r in read_metrics(run_dir)}


def differing(a: dict, b: dict) -> list[str]:
    """Names of the tensors of the student, teacher, teacher centres and AdamW state that are not bit-identical."""
    names = []
    for part in ("student", "teacher", "objective"):
        assert a[part].keys() == b[part].keys()
        names += [f"{part}.{k}" for k in a[part] if not torch.equal(a[part][k], b[part][k])]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for parameter in sa:
        names += [f"optimizer.{parameter}.{key}" for key in sa[parameter]
                  if not torch.equal(torch.as_tensor(sa[parameter][key]), torch.as_tensor(sb[parameter][key]))]
    return names


def test_a_skipped_step_changes_nothing(skipped_run):
    states, records = skipped_run
    before, after = states[SKIPPED], states[SKIPPED + 1]     # the checkpoints written before and after step 3
    assert (before["next_step"], after["next_step"]) == (SKIPPED, SKIPPED + 1)   # the step counter moves on
    assert records[SKIPPED].get("skipped_nonfinite") == 1
    assert all("skipped_nonfinite" not in records[s] for s in records if s != SKIPPED)
    assert differing(before, after) == []
    # every one of those parts does change in a step that is applied, so the comparison above can see a change
    changed = set(differing(states[SKIPPED - 1], before)) & set(differing(after, states[SKIPPED + 2]))
    for part in ("student.", "teacher.", "objective.dino_centering", "objective.ibot_centering", "optimizer."):
        assert any(name.startswith(part) for name in changed), part
    assert any(name.endswith(".step") for name in changed)   # AdamW's step count
    assert math.isfinite(records[SKIPPED + 1]["loss/total"])


def finite_state(next_step=7):
    generator = torch.Generator().manual_seed(0)
    return {"next_step": next_step, "student": {"w": torch.randn(3, 4, generator=generator), "n": torch.tensor(5)},
            "teacher": {"w": torch.randn(3, 4, generator=generator)}, "optimizer": {"state": {}, "param_groups": []},
            "objective": {"center": torch.zeros(1, 4)}, "rng": ckpt.capture_rng_state()}


@pytest.mark.parametrize("part, value", [("student", float("nan")), ("teacher", float("inf")),
                                         ("student", float("-inf"))])
def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, part, value):
    ckpt.write_checkpoint(tmp_path, finite_state(5), keep_last=3)     # the guard lets finite weights through
    state = finite_state()
    state[part]["w"][1, 2] = value
    with pytest.raises(RuntimeError, match=f"refusing to write a checkpoint: {part}.w holds NaN/Inf"):
        ckpt.write_checkpoint(tmp_path, state, keep_last=3)
    assert sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()) == ["step-00000005.pt"]   # no temp file
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000005.pt"
