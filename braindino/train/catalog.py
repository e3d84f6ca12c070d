"""The training configs shipped inside the package, addressable by name; ``braindino configs`` lists them.

The one copy of every config is ``braindino/configs/<name>.yaml`` (package data, so an installed wheel has them);
a clone's top-level ``configs/`` is a symlink to that folder. ``braindino train --config dino_vit_small`` resolves
the bare name to the shipped file; a path to any YAML file still works.
"""

from pathlib import Path

from braindino.errors import InputError

CONFIGS_FOLDER = Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> dict:
    """``{name: path}`` of the shipped configs, sorted by name (the name is the file name without ``.yaml``)."""
    return {path.stem: path for path in sorted(CONFIGS_FOLDER.glob("*.yaml"))}


def resolve_config(spec) -> Path:
    """The YAML file ``spec`` names: an existing file path, else a shipped config's name (``.yaml`` optional).

    Raises :class:`InputError` (one line listing the shipped names) for anything else.
    """
    path = Path(spec)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = str(spec).removesuffix(".yaml")
    if name in shipped:
        return shipped[name]
    cause = "no such config file" if len(path.parts) > 1 or path.suffix else "unknown config name"
    raise InputError(spec, cause, f"give a YAML file or one of: {', '.join(shipped)}")


def describe(path: Path) -> str:
    """The text of the file's first comment line (what the config is and what it is sized for)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""
