"""The features folder written by ``braindino extract`` / ``Encoder.embed_cohort``, and its reader.

Layout::

    FEATURES/index.csv     one row per embedded manifest row: the manifest's columns (path, subject, sequence,
                           split, volume_index, labels, mask, ...), then feature_file (relative to FEATURES),
                           model_fingerprint, content_hash (sha256 of the image file), n_slices
    FEATURES/errors.csv    path, subject, sequence, cause, hint (header only when every volume was embedded)
    FEATURES/model.json    name, fingerprint, preprocessing, input_size, embed_dim, patch_size, grid
    FEATURES/volumes/<key>.safetensors
                           cls [S, D] float32, mean_patch [S, D] float32, z [S] int32 (axial index in the RAS
                           canonical volume), hemispheres [S, 2, P] float32 (mean patch feature of each slice's
                           patient-Left, then patient-Right half of the patch grid; P = D for a ViT), optional
                           patch [S, N, P] float16; metadata "geometry" = JSON of ``VolumeEmbedding.geometry``

Files written before ``hemispheres`` existed still read (without it); extraction treats such a cached file as
stale and embeds the volume again.

``<key>`` (16 hex) is a hash of (model fingerprint, preprocessing, file content hash, volume_index, patch flag,
slice stride when not 1):
the cache key. A features folder belongs to one model: writing another model's features into it is refused.
Every file is written atomically (temporary sibling + rename); a failed write (a full disk) leaves no temporary
or partial file and raises a one-line ``OutputError`` naming the folder and the space the file needed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from braindino.atomic import atomic_path
from braindino.errors import InputError

INDEX_CSV = "index.csv"
ERRORS_CSV = "errors.csv"
MODEL_JSON = "model.json"
VOLUMES_DIR = "volumes"
ERROR_COLUMNS = ["path", "subject", "sequence", "cause", "hint"]
FEATURE_COLUMNS = ["feature_file", "model_fingerprint", "content_hash", "n_slices"]
MODEL_KEYS = ("name", "fingerprint", "preprocessing", "input_size", "embed_dim", "patch_size", "grid")
_ARRAY_GEOMETRY = ("affine", "native_affine")
_REWRITE_HINT = "extract the features again into a new --out folder"
_KEPT = "the volumes written before are kept and a rerun reuses them"


def feature_key(fingerprint: str, preprocessing: dict, content_hash: str, volume_index, patch_tokens: bool,
                slice_stride: int = 1) -> str:
    """16-hex cache key of one volume's features (``volume_index`` None for a 3D file; ``slice_stride`` k > 1: every
    k-th kept slice only)."""
    index = "" if volume_index is None or pd.isna(volume_index) else str(int(volume_index))
    parts = [fingerprint, preprocessing, content_hash, index, bool(patch_tokens)]
    text = json.dumps(parts + ([int(slice_stride)] if slice_stride != 1 else []), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def geometry_to_json(geometry: dict) -> str:
    """``VolumeEmbedding.geometry`` (numpy arrays, tuples) as a JSON string."""
    def plain(value):
        return None if value is None else np.asarray(value).tolist()
    return json.dumps({name: plain(value) for name, value in geometry.items()}, sort_keys=True)


def geometry_from_json(text: str) -> dict:
    """Inverse of :func:`geometry_to_json`: affines as ``[4, 4]`` float64 arrays, shapes and sizes as tuples/ints."""
    raw = json.loads(text)
    geometry = {}
    for name, value in raw.items():
        if value is None or isinstance(value, (int, float)):
            geometry[name] = value
        elif name in _ARRAY_GEOMETRY:
            geometry[name] = np.asarray(value, dtype=np.float64)
        else:
            geometry[name] = tuple(value)
    return geometry


def write_volume_features(path, cls: np.ndarray, mean_patch: np.ndarray, z: np.ndarray, geometry: dict,
                          patch: np.ndarray | None = None, hemispheres: np.ndarray | None = None) -> None:
    """Atomically write one volume's features: cls/mean_patch ``[S, D]``, z ``[S]``, patch ``[S, N, P]`` or None,
    hemispheres ``[S, 2, P]`` (always given by extraction; None only for hand-made feature files)."""
    from safetensors.numpy import save_file

    tensors = {"cls": np.ascontiguousarray(cls, dtype=np.float32),
               "mean_patch": np.ascontiguousarray(mean_patch, dtype=np.float32),
               "z": np.ascontiguousarray(z, dtype=np.int32)}
    if hemispheres is not None:
        tensors["hemispheres"] = np.ascontiguousarray(hemispheres, dtype=np.float32)
    if patch is not None:
        tensors["patch"] = np.ascontiguousarray(patch, dtype=np.float16)
    needed = sum(array.nbytes for array in tensors.values())
    with atomic_path(path, needed_bytes=needed, kept=_KEPT) as tmp:
        save_file(tensors, str(tmp), metadata={"geometry": geometry_to_json(geometry)})


def read_volume_features(path) -> dict:
    """→ dict(cls [S, D], mean_patch [S, D], z [S], hemispheres [S, 2, P] and patch [S, N, P] when stored,
    geometry dict)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
            metadata = handle.metadata() or {}
        geometry = geometry_from_json(metadata["geometry"])
    except FileNotFoundError:
        raise InputError(path, "feature file is missing", _REWRITE_HINT) from None
    except Exception as err:   # damaged safetensors header or metadata
        raise InputError(path, f"feature file is unreadable ({type(err).__name__})", _REWRITE_HINT) from None
    missing = {"cls", "mean_patch", "z"} - arrays.keys()
    if missing:
        raise InputError(path, f"feature file lacks {', '.join(sorted(missing))}", _REWRITE_HINT)
    return {**arrays, "geometry": geometry}


def feature_slice_count(path) -> int | None:
    """Number of slices ``S`` in a feature file, from its header (the arrays are not read); None when the file
    predates the ``hemispheres`` tensor (so a cache treats it as stale)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            if "hemispheres" not in handle.keys():
                return None
            return int(handle.get_slice("z").get_shape()[0])
    except Exception as err:
        raise InputError(path, f"feature file is unreadable ({type(err).__name__})", _REWRITE_HINT) from None


class Features:
    """A features folder: ``index`` (DataFrame of index.csv), ``model`` (dict of model.json), ``errors``
    (DataFrame of errors.csv), ``load(i)`` → the arrays of index row ``i``."""

    def __init__(self, root, index: pd.DataFrame, model: dict, errors: pd.DataFrame):
        self.root = Path(root)
        self.index = index
        self.model = model
        self.errors = errors

    def __len__(self) -> int:
        return len(self.index)

    def path(self, i: int) -> Path:
        """Absolute path of the feature file of index row ``i`` (position, 0-based)."""
        return self.root / str(self.index["feature_file"].iat[i])

    def load(self, i: int) -> dict:
        """Row ``i`` (position) → dict(cls [S, D] f32, mean_patch [S, D] f32, z [S] int32, hemispheres [S, 2, P]
        f32 (absent in files of an older braindino), patch [S, N, P] f16 when extracted with patch tokens,
        geometry dict)."""
        return read_volume_features(self.path(i))

    def __repr__(self) -> str:
        return (f"Features({str(self.root)!r}: {len(self)} volumes by {self.model.get('name')!r} "
                f"[{self.model.get('fingerprint')}], {len(self.errors)} errors)")


def read_model_json(root) -> dict | None:
    """model.json of a features folder, or None when the folder has none yet."""
    path = Path(root) / MODEL_JSON
    if not path.is_file():
        return None
    try:
        model = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(path, f"model.json is unreadable ({type(err).__name__})", _REWRITE_HINT) from None
    if not isinstance(model, dict) or not set(MODEL_KEYS) <= model.keys():
        raise InputError(path, "model.json lacks " + ", ".join(sorted(set(MODEL_KEYS) - set(model or {}))),
                         _REWRITE_HINT)
    return model


def open_features(root) -> Features:
    """Open a features folder; raises InputError when it is missing or malformed."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "features folder not found",
                         "create it with: braindino extract --model MODEL --manifest CSV --out FEATURES")
    model = read_model_json(root)
    if model is None or not (root / INDEX_CSV).is_file():
        raise InputError(root, "not a features folder (no model.json / index.csv)",
                         "create it with: braindino extract --model MODEL --manifest CSV --out FEATURES")
    try:
        index = pd.read_csv(root / INDEX_CSV, dtype={"path": str, "subject": str, "sequence": str, "split": str,
                                                     "feature_file": str, "model_fingerprint": str,
                                                     "content_hash": str}, keep_default_na=True)
        errors_path = root / ERRORS_CSV
        errors = (pd.read_csv(errors_path, dtype=str).fillna("") if errors_path.is_file()
                  else pd.DataFrame(columns=ERROR_COLUMNS))
    except (OSError, ValueError) as err:
        raise InputError(root / INDEX_CSV, f"index is unreadable ({type(err).__name__})", _REWRITE_HINT) from None
    missing = [column for column in ("path", "subject", *FEATURE_COLUMNS) if column not in index.columns]
    if missing:
        raise InputError(root / INDEX_CSV, f"index lacks column(s) {', '.join(missing)}", _REWRITE_HINT)
    for column in ("sequence", "split"):
        if column in index.columns:
            index[column] = index[column].fillna("")
    if "volume_index" in index.columns:
        index["volume_index"] = index["volume_index"].astype("Int64")
    return Features(root, index, model, errors)


def write_table(path, table: pd.DataFrame) -> None:
    """Atomically write a CSV table."""
    with atomic_path(path, needed_bytes=int(table.memory_usage(deep=True).sum()), kept=_KEPT) as tmp:
        table.to_csv(tmp, index=False)


def volume_file(key: str) -> str:
    """Feature file name of cache key ``key``, relative to the features folder."""
    return os.path.join(VOLUMES_DIR, f"{key}.safetensors")
