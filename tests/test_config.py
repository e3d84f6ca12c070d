from pathlib import Path

import pytest
from omegaconf import OmegaConf

from braindino.train.config import load_config, save_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.objective in ("dino", "simclr")
    assert config.crops.global_size % config.model.patch_size == 0


def test_overrides_win_and_types_are_kept():
    config = load_config(CONFIGS[0], ["optim.iters=7", "model.depth=2", "train.knn_label=diagnosis"])
    assert config.optim.iters == 7 and config.model.depth == 2 and config.train.knn_label == "diagnosis"


def test_unknown_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="itres"):
        load_config(None, ["optim.itres=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {archh: vit_base}\n")
    with pytest.raises(ValueError, match="archh"):
        load_config(bad)


def test_bad_objective_is_rejected():
    with pytest.raises(ValueError, match="objective"):
        load_config(None, ["objective=mae"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(CONFIGS[0], ["seed=11"])
    save_config(config, tmp_path / "config.yaml")
    assert OmegaConf.load(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("override,message", [
    ("optim.iters=abc", "optim.iters must be of type int"),
    ("optim.global_batch_size=2.5", "optim.global_batch_size must be of type int"),
    ("train.distributed=fsdpp", "train.distributed must be one of"),
    ("dino.teacher_target=sinkorn", "dino.teacher_target must be one of"),
    ("train.precision=fp16", "train.precision must be one of"),
    ("model.arch=vit_huge", "model.arch must be one of"),
    ("optim.iters", "key=value"),
])
def test_wrong_values_are_rejected(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS[0], [override])


def test_ints_are_accepted_for_floats():
    assert load_config(CONFIGS[0], ["optim.base_lr=1"]).optim.base_lr == 1
