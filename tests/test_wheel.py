"""`pip install braindino` works away from the source tree.

Builds the sdist and, from it, the wheel (offline, with the setuptools already installed), installs the wheel with
``pip install --no-deps --target SITE`` and runs it from an empty folder outside the checkout with
``PYTHONPATH=SITE``, so the wheel's braindino shadows the editable install while reusing the installed
dependencies: ``--version``, ``configs`` and a shrunken ``braindino demo`` (synth → prepare → train by config
name → export → probe → report).
"""

import email
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

import braindino
from braindino.demo import CONFIG as DEMO_CONFIG
from braindino.train.catalog import CONFIGS_FOLDER

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(path.name for path in CONFIGS_FOLDER.glob("*.yaml"))
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    "runs", "demo", ".whl", "wandb")

if importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("pip") is None:
    pytest.skip("building a wheel needs setuptools and pip in this environment", allow_module_level=True)


def run(command, cwd, env=None) -> subprocess.CompletedProcess:
    """Run ``command`` to completion (no wall-clock limit of its own: pytest-timeout bounds a hang, and a busy
    machine only makes it slower)."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8")
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist, wheel, site): built from a copy of the checkout (the build never writes into it), wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCE)
    run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                               "print(build_meta.build_sdist(sys.argv[1]))", str(tmp / "dist")], cwd=source)
    sdist = next((tmp / "dist").glob("braindino-*.tar.gz"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir"]
    run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(sdist)],
        cwd=tmp)
    wheel = next((tmp / "dist").glob("braindino-*.whl"))
    run(pip + ["install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)], cwd=tmp)
    return sdist, wheel, tmp / "site"


def test_wheel_ships_the_configs_once_the_license_and_no_tests(built):
    _, wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        yamls = sorted(name for name in names if name.endswith(".yaml"))
        assert yamls == [f"braindino/configs/{name}" for name in SHIPPED]
        for name in SHIPPED:
            assert archive.read(f"braindino/configs/{name}") == (CONFIGS_FOLDER / name).read_bytes()
        info = f"braindino-{braindino.__version__}.dist-info"
        assert archive.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        meta = email.message_from_string(archive.read(f"{info}/METADATA").decode("utf-8"))
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert not [name for name in names if name.startswith(("tests/", "configs/", "bench/"))]
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert meta["License"] == "Apache-2.0" and meta["Requires-Python"] == ">=3.10"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().strip() == (ROOT / "README.md").read_text(encoding="utf-8").strip()
    assert "Source, https://github.com/braindino/braindino" in meta.get_all("Project-URL")
    assert set(meta.get_all("Provides-Extra")) == {"xformers", "test"}
    assert "braindino = braindino.cli:main" in entry_points
    assert "train_dino = braindino.cli.train:main" in entry_points


def test_sdist_holds_each_config_once(built):
    sdist, _, _ = built
    with tarfile.open(sdist) as archive:
        names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
    assert sorted(name for name in names if name.endswith(".yaml")) == [f"braindino/configs/{n}" for n in SHIPPED]
    assert "LICENSE" in names and "README.md" in names
    assert not [name for name in names if name.startswith("tests/")]


def test_installed_wheel_runs_the_demo_outside_the_source_tree(built, tmp_path):
    _, _, site = built
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    python = [sys.executable]

    where = run(python + ["-c", "import braindino; print(braindino.__file__)"], elsewhere, env).stdout.strip()
    assert Path(where).resolve().is_relative_to(site.resolve())

    version = run(python + ["-m", "braindino.cli", "--version"], elsewhere, env).stdout
    torch_version, timm_version = metadata.version("torch"), metadata.version("timm")
    assert version.startswith(f"braindino {braindino.__version__}; torch {torch_version}, timm {timm_version}, ")
    assert "git" not in version   # an installed wheel is no git clone

    listing = run(python + ["-m", "braindino.cli", "configs"], elsewhere, env).stdout.splitlines()
    assert [line.split()[0] for line in listing] == [name.removesuffix(".yaml") for name in SHIPPED]

    demo = run(python + ["-m", "braindino.cli", "demo", "--out", "D", "--subjects", "2", "--heldout-subjects", "8",
                         "--iters", "2", "--resolution", "4", "--workers", "1", "--fractions", "100", "--seeds", "0",
                         "--bootstrap", "10"], elsewhere, env)
    assert "demo finished" in demo.stdout
    assert (elsewhere / "D" / "probe" / "report.md").is_file()
    provenance = json.loads((elsewhere / "D" / "model" / "config.json").read_text())["braindino"]["provenance"]
    assert provenance["braindino_version"] == braindino.__version__ and provenance["git_commit"] is None
    assert (provenance["torch_version"], provenance["timm_version"]) == (torch_version, timm_version)
    assert DEMO_CONFIG in demo.stdout                    # the demo found its shipped config from elsewhere
    assert not list(elsewhere.glob("*.egg-info")) and sorted(p.name for p in elsewhere.iterdir()) == ["D"]
