import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import braindino
from braindino.cli import main
from braindino.errors import InputError
from braindino.train.catalog import CONFIGS_FOLDER, resolve_config, shipped_configs
from braindino.train.config import load_config, save_config
from braindino.version import git_commit, version_line

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = list(shipped_configs().values())
NAMES = ("dino_vit_base", "dino_vit_large", "dino_vit_small", "dino_vit_tiny_cpu", "simclr_vit_base",
         "simclr_vit_tiny_cpu")
SHA = "0123456789abcdef0123456789abcdef01234567"


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


def test_the_repository_configs_folder_is_the_shipped_one():
    assert tuple(shipped_configs()) == NAMES
    assert CONFIGS_FOLDER == ROOT / "braindino" / "configs"
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == CONFIGS_FOLDER.resolve()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_state_what_they_are(path):
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    raw = OmegaConf.load(path)
    assert first_line.startswith("# ") and len(first_line) > 20
    assert {"objective", "model"} <= set(raw) and {"arch", "patch_size"} <= set(raw.model)


def test_names_resolve_to_the_shipped_files_and_paths_still_work(tmp_path, monkeypatch):
    small = CONFIGS_FOLDER / "dino_vit_small.yaml"
    assert resolve_config("dino_vit_small") == small and resolve_config("dino_vit_small.yaml") == small
    assert load_config("dino_vit_small") == load_config(small)
    own = tmp_path / "dino_vit_small.yaml"
    own.write_text("model: {arch: vit_tiny}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("dino_vit_small.yaml").model.arch == "vit_tiny"   # an existing file wins over a name
    assert load_config("dino_vit_small").model.arch == "vit_small"
    assert load_config(own).model.arch == "vit_tiny"


@pytest.mark.parametrize("spec,cause", [("dino_vit_smal", "unknown config name"),
                                        ("configs/dino_vit_smal.yaml", "no such config file"),
                                        ("mine.yaml", "no such config file")])
def test_an_unknown_config_is_one_error_line_listing_the_shipped_names(spec, cause, tmp_path, capsys):
    with pytest.raises(InputError):
        resolve_config(spec)
    status = main(["train", "--config", spec, "--data", str(tmp_path / "store"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2
    assert err == f"error: {spec}: {cause} — give a YAML file or one of: {', '.join(NAMES)}\n"
    assert not (tmp_path / "run").exists()


def test_configs_command_lists_model_objective_and_purpose(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(NAMES)
    for line, (name, path) in zip(lines, shipped_configs().items()):
        raw = OmegaConf.load(path)
        purpose = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
        assert line.split()[:3] == [name, raw.objective, f"{raw.model.arch}/{raw.model.patch_size}"]
        assert line.endswith("  " + purpose)


def test_version_prints_version_commit_and_libraries(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out == version_line() + "\n"
    assert out.startswith(f"braindino {braindino.__version__}")
    assert f"torch {metadata.version('torch')}, timm {metadata.version('timm')}" in out
    if shutil.which("git") and (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, encoding="utf-8").stdout.strip()
        assert git_commit() == head and f"(git {head[:12]})" in out


def fake_clone(root: Path, head: str, setup: str = "[metadata]\nname = braindino\n") -> Path:
    (root / ".git" / "refs" / "heads").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text(head)
    (root / "setup.cfg").write_text(setup)
    return root


def test_git_commit_reads_loose_packed_detached_and_worktree_heads(tmp_path):
    loose = fake_clone(tmp_path / "loose", "ref: refs/heads/main\n")
    (loose / ".git" / "refs" / "heads" / "main").write_text(SHA + "\n")
    packed = fake_clone(tmp_path / "packed", "ref: refs/heads/main\n")
    (packed / ".git" / "packed-refs").write_text(f"# pack-refs with: peeled\n{'f' * 40} refs/heads/other\n"
                                                 f"{SHA} refs/heads/main\n")
    detached = fake_clone(tmp_path / "detached", SHA + "\n")
    worktree = tmp_path / "worktree"
    (worktree / "gitdir").mkdir(parents=True)
    (worktree / "gitdir" / "HEAD").write_text("ref: refs/heads/feature\n")
    (worktree / "gitdir" / "commondir").write_text("../../packed/.git\n")
    (packed / ".git" / "refs" / "heads" / "feature").write_text(SHA[::-1] + "\n")
    (worktree / ".git").write_text("gitdir: gitdir\n")
    (worktree / "setup.cfg").write_text("[metadata]\nname = braindino\n")
    assert [git_commit(root) for root in (loose, packed, detached, worktree)] == [SHA, SHA, SHA, SHA[::-1]]


def test_git_commit_is_none_outside_a_braindino_clone(tmp_path):
    other = fake_clone(tmp_path / "other", SHA, setup="[metadata]\nname = something_else\n")
    garbage = fake_clone(tmp_path / "garbage", "not a commit\n")
    dangling = fake_clone(tmp_path / "dangling", "ref: refs/heads/gone\n")
    no_git = tmp_path / "no_git"
    no_git.mkdir()
    (no_git / "setup.cfg").write_text("[metadata]\nname = braindino\n")
    binary = fake_clone(tmp_path / "binary", "ref: refs/heads/main\n")
    (binary / ".git" / "refs" / "heads" / "main").write_bytes(b"\xff\xfe")
    assert [git_commit(root) for root in (other, garbage, dangling, no_git, binary, tmp_path / "absent")] == \
        [None] * 6


def test_training_provenance_records_versions_and_commit(tiny_store):
    from braindino.store import SliceStore
    from braindino.train.checkpoint import training_provenance

    provenance = training_provenance(load_config("dino_vit_tiny_cpu"), SliceStore(tiny_store), "objective: dino\n")
    assert provenance["braindino_version"] == braindino.__version__
    assert provenance["git_commit"] == git_commit()
    assert provenance["torch_version"] == metadata.version("torch")
    assert provenance["timm_version"] == metadata.version("timm")
    assert provenance["python_version"].count(".") == 2


def test_python_dash_m_braindino_train_is_the_training_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "braindino.train", "--help"], capture_output=True, text=True, encoding="utf-8",
                          timeout=120)
    assert done.returncode == 0 and "--config" in done.stdout and "--resume" in done.stdout
