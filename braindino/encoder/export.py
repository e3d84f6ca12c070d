"""Export a training checkpoint's backbone as a model folder (see :mod:`braindino.encoder.model_folder`).

The teacher's (or student's) ``backbone.vit.*`` weights become timm ``VisionTransformer`` weights (prefix removed;
the iBOT ``mask_token`` is dropped: a frozen encoder never masks). The DINO / iBOT / SimCLR heads can be written
beside them as ``heads.safetensors``. Everything export needs about preprocessing and architecture comes from the
checkpoint's ``provenance`` (recorded by ``braindino train``).

The files are written into a temporary sibling folder first and only then renamed into ``out`` (``config.json``
last): a failed export (a full disk) leaves an earlier export in ``out`` as it was, loadable, and no temporary
files; it raises a one-line ``OutputError`` naming the folder and the space the model needs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from braindino.errors import InputError, OutputError, write_error
from braindino.models import PRESETS
from braindino.train.checkpoint import latest_checkpoint, load_checkpoint

BACKBONE_PREFIX = "backbone.vit."


def resolve_checkpoint(source) -> Path:
    """A checkpoint file, or the latest checkpoint of a run folder."""
    source = Path(source)
    if source.is_dir():
        found = latest_checkpoint(source)
        if found is None:
            raise InputError(source, "run folder holds no checkpoints/step-*.pt",
                             "give a run folder of braindino train, or a checkpoint file")
        return found
    if not source.is_file():
        raise InputError(source, "checkpoint not found", "give a run folder or a RUN/checkpoints/step-*.pt file")
    return source


def split_network(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Network state dict → (timm ViT weights without the ``backbone.vit.`` prefix, head weights)."""
    state = {name.removeprefix("module."): tensor for name, tensor in state.items()}
    backbone = {name[len(BACKBONE_PREFIX):]: tensor for name, tensor in state.items()
                if name.startswith(BACKBONE_PREFIX)}
    heads = {name: tensor for name, tensor in state.items() if not name.startswith("backbone.")}
    return backbone, heads


def drop_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Keep one name per storage (a shared DINO/iBOT head appears twice) → (tensors, {dropped: kept})."""
    kept, aliases, owners = {}, {}, {}
    for name, tensor in sorted(tensors.items()):
        owner = owners.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape), name)
        if owner == name:
            kept[name] = tensor
        else:
            aliases[name] = owner
    return kept, aliases


def export_model(checkpoint, out, network: str | None = None, with_heads: bool = False) -> dict:
    """Write the model folder ``out`` from ``checkpoint`` (file or run folder); returns its ``config.json``.

    ``network``: "teacher" | "student" | None (the teacher when the checkpoint has one, else the student).
    """
    from braindino.encoder.model_folder import timm_config, write_model_folder

    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    provenance = state.get("provenance")
    if not isinstance(provenance, dict):
        raise InputError(path, "checkpoint has no provenance (written before braindino recorded it)",
                         "resume the run for one checkpoint interval with this braindino, then export again")
    network = network or ("teacher" if "teacher" in state else "student")
    if network not in ("teacher", "student"):
        raise ValueError(f"network must be teacher or student, got {network!r}")
    if network == "teacher" and "teacher" not in state:
        raise InputError(path, f"a {provenance['objective']} checkpoint has no teacher",
                         "export it with --network student")
    weights, heads = split_network(state[network])
    if not weights:
        raise InputError(path, f"{network} holds no backbone.vit.* weights", "give a braindino checkpoint")
    preset = PRESETS[provenance["arch"]]
    depth = provenance["depth"] if provenance["depth"] is not None else preset["depth"]
    provenance = {**provenance, "checkpoint": str(path.resolve()), "network": network}
    config = timm_config(provenance["arch"], preset["embed_dim"], depth, preset["num_heads"],
                         provenance["patch_size"], provenance["input_size"], provenance["num_register_tokens"],
                         provenance["layerscale_init"], provenance["preprocessing"], provenance)
    heads, aliases = drop_shared(heads)
    heads = heads if with_heads else None
    needed = sum(t.numel() * t.element_size() for part in (weights, heads or {}) for t in part.values())
    write_beside_then_move(Path(out), needed, lambda folder: write_model_folder(
        folder, config, weights, heads, {"aliases": json.dumps(aliases)}))
    return config


def write_beside_then_move(out: Path, needed_bytes: int, write) -> None:
    """``write(folder)`` into a fresh temporary sibling of ``out``, then rename its files into ``out`` (config.json
    last; renames need no space) and drop files of an earlier export that this one has not (heads)."""
    from braindino.encoder.model_folder import CONFIG_JSON, HEADS

    kept = ("the model already in it is unchanged" if (out / CONFIG_JSON).is_file() else "nothing was written")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as err:
        raise write_error(err, out, "the model folder", needed_bytes, kept) from err
    try:
        write(staging)
        out.mkdir(exist_ok=True)
        names = sorted(p.name for p in staging.iterdir())
        for name in sorted(names, key=lambda n: n == CONFIG_JSON):
            os.replace(staging / name, out / name)
        if HEADS not in names:
            (out / HEADS).unlink(missing_ok=True)
    except OutputError as err:
        raise write_error(err.__cause__ or err, out, "the model folder", needed_bytes, kept) from err
    except OSError as err:
        raise write_error(err, out, "the model folder", needed_bytes, kept) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
