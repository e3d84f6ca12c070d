"""Training checkpoints: full (unsharded) state, written atomically by rank 0, loadable at any world size.

A checkpoint holds everything a resumed run needs to continue bit-identically: student, teacher, optimiser,
loss state (teacher centres), the next step to run (the data order and the per-step random streams are pure
functions of the step, see ``braindino.train.data``), and the global RNG states. It is a plain dict of tensors
and Python scalars, read back with ``torch.load(weights_only=True)``.

It also holds ``"provenance"`` (plain str / numbers / dicts, see :func:`training_provenance`): what
``braindino export`` needs to describe the model (preprocessing, input size, architecture) and where it came from.
"""

import hashlib
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                      get_optimizer_state_dict, set_model_state_dict,
                                                      set_optimizer_state_dict)

from braindino.atomic import atomic_path
from braindino.errors import InputError

CHECKPOINT_PATTERN = re.compile(r"step-(\d{8})\.pt$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
REQUIRED_KEYS = ("next_step", "student", "optimizer", "objective", "rng")
NOT_A_CHECKPOINT_HINT = "give a RUN/checkpoints/step-*.pt file written by braindino train"


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint with the highest step in ``run_dir/checkpoints`` (temporary files are ignored)."""
    found = sorted((int(m.group(1)), p) for p in checkpoint_dir(run_dir).glob("step-*.pt")
                   if (m := CHECKPOINT_PATTERN.search(p.name)))
    return found[-1][1] if found else None


def capture_rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():   # a resume may see fewer GPUs than the run that saved
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def gather_training_state(student, teacher, optimizer, objective, next_step: int) -> dict:
    """Collect the full training state on every rank (collective under FSDP); only rank 0 needs to write it."""
    state = {
        "next_step": next_step,
        "student": get_model_state_dict(student, options=_FULL),
        "optimizer": get_optimizer_state_dict(student, optimizer, options=_FULL),
        "objective": {k: v.cpu() for k, v in objective.state_dict().items()},
        "rng": capture_rng_state(),
    }
    if teacher is not None:
        state["teacher"] = get_model_state_dict(teacher, options=_FULL)
    return state


def assert_finite(state: dict) -> None:
    """Refuse to write a checkpoint whose weights hold NaN or Inf."""
    for part in ("student", "teacher"):
        for name, tensor in state.get(part, {}).items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise RuntimeError(f"refusing to write a checkpoint: {part}.{name} holds NaN/Inf")


def state_bytes(obj) -> int:
    """Bytes of all tensors in a (nested) state: about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(value) for value in obj)
    return 0


def write_checkpoint(run_dir, state: dict, keep_last: int) -> Path:
    """Atomically write ``step-XXXXXXXX.pt`` (numbered by steps completed) and keep the newest ``keep_last``.

    A failed write (full disk) raises a one-line ``OutputError`` and leaves no partial or temporary file; the
    earlier checkpoints are only pruned once the new one is in place.
    """
    assert_finite(state)
    directory = checkpoint_dir(run_dir)
    path = directory / f"step-{state['next_step']:08d}.pt"
    previous = latest_checkpoint(run_dir)
    kept = (f"rerun with --resume to continue from {previous.name}, which is intact" if previous is not None
            else "no earlier checkpoint exists")
    with atomic_path(path, needed_bytes=state_bytes(state), kept=kept) as tmp:
        with open(tmp, "wb") as file:   # through a Python file, so a failed write keeps its OSError (ENOSPC)
            torch.save(state, file)
    existing = sorted(p for p in directory.glob("step-*.pt") if CHECKPOINT_PATTERN.search(p.name))
    for old in existing[:-keep_last]:
        old.unlink()
    return path


def newest_intact_before(path) -> Path | None:
    """The newest checkpoint beside ``path`` with a lower step that loads, or None."""
    path = Path(path)
    match = CHECKPOINT_PATTERN.search(path.name)
    step = int(match.group(1)) if match else None
    earlier = sorted(((int(m.group(1)), p) for p in path.parent.glob("step-*.pt")
                      if (m := CHECKPOINT_PATTERN.search(p.name)) and (step is None or int(m.group(1)) < step)),
                     reverse=True)
    for _, candidate in earlier:
        try:
            load_checkpoint(candidate)
        except InputError:
            continue
        return candidate
    return None


def load_checkpoint(path) -> dict:
    """Read a checkpoint with ``weights_only=True``; raises InputError (one line) for any other file."""
    try:
        with warnings.catch_warnings():   # torch warns about unusual pickle protocols; the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "checkpoint file not found", NOT_A_CHECKPOINT_HINT) from None
    except Exception as err:   # garbage, a truncated file, or a pickle that needs more than tensors and containers
        raise InputError(path, f"not a braindino checkpoint ({type(err).__name__})", NOT_A_CHECKPOINT_HINT) from None
    missing = [key for key in REQUIRED_KEYS if key not in state] if isinstance(state, dict) else list(REQUIRED_KEYS)
    if missing:
        raise InputError(path, f"not a braindino checkpoint (no {', '.join(missing)})", NOT_A_CHECKPOINT_HINT)
    return state


def store_fingerprint(store) -> str:
    """16 hex: sha256 over the store's preprocessing and its volumes' (content_hash, volume_index), sorted."""
    volumes = store.volumes
    indices = volumes["volume_index"] if "volume_index" in volumes.columns else [None] * len(volumes)
    entries = sorted(f"{digest}#{'' if pd.isna(index) else int(index)}"
                     for digest, index in zip(volumes["content_hash"], indices))
    text = repr((sorted(store.preprocessing.items()), entries))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def training_provenance(config, store, config_yaml: str) -> dict:
    """What export needs, as plain values: preprocessing, input size, architecture, objective, origin.

    ``init_from_normalisation_folded`` is True when ``model.init_from`` weights were loaded with an input
    normalisation folded into the patch embedding (the exported model then still takes [0, 1] slices).
    """
    from braindino.version import versions

    model, library = config.model, versions()
    return {
        "braindino_version": library["braindino"],
        "git_commit": library["git_commit"],
        "torch_version": library["torch"],
        "timm_version": library["timm"],
        "python_version": library["python"],
        "objective": str(config.objective),
        "iters": int(config.optim.iters),
        "config_yaml": config_yaml,
        "preprocessing": dict(store.preprocessing),
        "store_path": str(Path(store.root).resolve()),
        "store_fingerprint": store_fingerprint(store),
        "store_volumes": int(len(store.volumes)),
        "store_slices": int(len(store)),
        "input_size": int(config.crops.global_size),
        "arch": str(model.arch),
        "patch_size": int(model.patch_size),
        "depth": None if model.depth is None else int(model.depth),
        "num_register_tokens": int(model.num_register_tokens),
        "layerscale_init": None if model.layerscale_init is None else float(model.layerscale_init),
        "init_from": None if not model.init_from else str(model.init_from),
        "init_from_normalisation_folded": bool(model.init_from) and model.init_from_normalisation != "none",
    }


def restore_training_state(state: dict, student, teacher, optimizer, objective) -> int:
    """Load ``state`` into the (possibly wrapped or sharded) modules; returns the next step to run."""
    load_options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    # into DDP's inner module: DDP's name mapping misses the second name of a shared head (ibot_head = dino_head)
    network = student.module if isinstance(student, torch.nn.parallel.DistributedDataParallel) else student
    set_model_state_dict(network, state["student"], options=load_options)
    # parameters that never had a gradient yet (the DINO head's last layer while frozen) have no AdamW state
    optimizer_options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=False)
    set_optimizer_state_dict(student, optimizer, state["optimizer"], options=optimizer_options)
    if teacher is not None:
        set_model_state_dict(teacher, state["teacher"], options=load_options)
    objective.load_state_dict(state["objective"])
    restore_rng_state(state["rng"])
    return int(state["next_step"])
