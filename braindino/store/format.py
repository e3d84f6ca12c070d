"""On-disk layout of a slice store, and the low-level writer that keeps it consistent.

A store is a folder::

    STORE/store.json                 format_version, preprocessing config, height, width, dtype, shard list,
                                     the name of the current index folder, volume and slice counts
    STORE/shards/shard-00000.f16     raw little-endian float16 slices, C order, shape [n, height, width];
                                     at most ``shard_bytes`` each (default 1 GiB), never modified once named
    STORE/index-000003/volumes.csv   one row per stored volume (columns below)
    STORE/index-000003/slices.npy    [N] structured array (volume: int32 row of volumes.csv, z: int32 index
                                     of the slice along Z of the canonical volume), read with mmap_mode="r"
    STORE/errors.csv                 the volumes the last ``braindino prepare`` run could not store
    STORE/.lock                      held (flock) while a writer is open; a second writer is refused

Global slice ``i`` belongs to volume ``v = slices["volume"][i]`` and lives in shard ``volumes.shard[v]`` at row
``volumes.shard_start[v] + i - volumes.first_slice[v]``. The slices of one volume are contiguous, both in the
global order (``first_slice .. first_slice + n_slices``) and inside one shard (a volume never spans shards).

volumes.csv columns: ``volume_id`` (stable id derived from path and volume_index), ``path``, ``volume_index``
(empty for 3D files), the manifest's other columns (``subject``, ``sequence``, ``split``, labels) carried
through, then ``content_hash`` (sha256 of the file), ``shard``, ``shard_start``, ``first_slice``, ``n_slices``,
``spacing_x/y/z`` (mm, canonical RAS grid), ``shape_x/y/z`` (canonical voxel grid), ``crop_row``, ``crop_col``
and ``resampled_rows``, ``resampled_cols`` (to map a slice back to native space), ``affine`` (JSON [4, 4]).

Atomicity: a shard is written as ``shard-XXXXX.f16.tmp``, fsynced and renamed; the index is written to
``index-XXXXXX.tmp/``, fsynced and renamed; only then is ``store.json`` replaced (the commit point) and older
index folders removed. A reader follows ``store.json`` alone, so it never sees a half-written file, and a killed
writer leaves the last committed store intact; the next writer deletes the leftovers. Slices of a volume that
was re-ingested stay in their shard as dead space, unreferenced by the index. Two volumes.csv rows may share the
same shard rows (a file copied or moved to a new path reuses the stored slices, see ``copy_volume``).
"""

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from braindino.atomic import atomic_path
from braindino.errors import InputError

FORMAT_VERSION = 1
STORE_JSON = "store.json"
ERRORS_CSV = "errors.csv"
SHARDS_DIR = "shards"
VOLUMES_CSV = "volumes.csv"
SLICES_NPY = "slices.npy"
LOCK_FILE = ".lock"
SLICE_DTYPE = np.dtype([("volume", "<i4"), ("z", "<i4")])
PIXEL_DTYPE = np.dtype("<f2")
DEFAULT_SHARD_BYTES = 1 << 30

IDENTITY_COLUMNS = ["volume_id", "path", "volume_index"]
STORE_COLUMNS = ["content_hash", "shard", "shard_start", "first_slice", "n_slices",
                 "spacing_x", "spacing_y", "spacing_z", "shape_x", "shape_y", "shape_z",
                 "crop_row", "crop_col", "resampled_rows", "resampled_cols", "affine"]
RESERVED_COLUMNS = frozenset(IDENTITY_COLUMNS + STORE_COLUMNS)
_STRING_COLUMNS = {"volume_id": str, "path": str, "content_hash": str, "affine": str,
                   "subject": str, "sequence": str, "split": str, "volume_index": "Int64"}
_TEXT_MANIFEST_COLUMNS = ("subject", "sequence", "split")   # "" when absent, as read_manifest gives them


def shard_file(shard: int) -> str:
    """Path of shard number ``shard`` relative to the store root."""
    return f"{SHARDS_DIR}/shard-{shard:05d}.f16"


def index_dir_name(generation: int) -> str:
    return f"index-{generation:06d}"


def volume_key(path, volume_index) -> tuple[str, int | None]:
    """Identity of a stored volume: absolute file path and (for 4D files) the volume index."""
    missing = volume_index is None or (not isinstance(volume_index, str) and pd.isna(volume_index))
    return os.path.abspath(str(path)), None if missing else int(volume_index)


def volume_id(key: tuple[str, int | None]) -> str:
    """Stable 16-hex-digit id of a volume key (unchanged when the file's content changes)."""
    path, index = key
    return hashlib.sha256(f"{path}#{'' if index is None else index}".encode()).hexdigest()[:16]


def normalised_config(config: dict) -> dict:
    """The preprocessing config as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(config, sort_keys=True))


def read_meta(root) -> dict:
    """Read and validate ``store.json``; raises InputError when it is missing or of an unknown version."""
    path = Path(root) / STORE_JSON
    if not path.is_file():
        raise InputError(root, "not a slice store (no store.json)",
                         "create it with: braindino prepare --manifest CSV --out STORE")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(path, f"store.json is unreadable ({err})", "prepare the store again into a new folder")
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise InputError(path, f"store format version {version!r} is not supported (this braindino reads "
                         f"version {FORMAT_VERSION})", "use the braindino release that wrote the store, or "
                         "prepare a new store into a new --out folder")
    return meta


def read_volumes(root, meta: dict) -> pd.DataFrame:
    """The committed volumes table (one row per stored volume)."""
    volumes = pd.read_csv(Path(root) / meta["index"] / VOLUMES_CSV, dtype=_STRING_COLUMNS)
    for column in _TEXT_MANIFEST_COLUMNS:
        if column in volumes.columns:
            volumes[column] = volumes[column].fillna("")
    return volumes


def open_slice_table(root, meta: dict) -> np.ndarray:
    """The committed [N] slice table (fields volume, z), memory-mapped read-only."""
    return np.load(Path(root) / meta["index"] / SLICES_NPY, mmap_mode="r" if meta["n_slices"] else None)


def _same_value(a, b) -> bool:
    """Equality of two table cells where missing values (None, NaN, pd.NA) equal each other."""
    if pd.isna(a) or pd.isna(b):
        return pd.isna(a) and pd.isna(b)
    return a == b


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_durably(path, obj) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(Path(path).parent)


class _ShardFile:
    """The shard being filled: appends [k, H, W] float16 blocks to ``shard-XXXXX.f16.tmp``."""

    def __init__(self, root: Path, number: int, slice_bytes: int):
        self.final_path = root / shard_file(number)
        self.tmp_path = self.final_path.with_name(self.final_path.name + ".tmp")
        self.number = number
        self.rows = 0
        self._slice_bytes = slice_bytes
        self._file = open(self.tmp_path, "wb")

    def append(self, slices: np.ndarray) -> int:
        """Append [k, H, W] slices; returns the row of the first one."""
        start = self.rows
        self._file.write(np.ascontiguousarray(slices, dtype=PIXEL_DTYPE).tobytes())
        self.rows += len(slices)
        return start

    def finish(self) -> None:
        """Make the shard durable and visible under its final name. Bytes past the counted rows (a write cut
        short by Ctrl-C) are cut off, so the file always holds exactly ``rows`` whole slices."""
        self._file.flush()
        self._file.truncate(self.rows * self._slice_bytes)
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.final_path)
        _fsync_dir(self.final_path.parent)


class StoreBuilder:
    """Creates a store or appends to one; use as a context manager (commits on exit, also on an error).

    ``preprocessing`` is the config the slices were made with; appending to a store made with another config
    raises InputError. ``add_volume(record, slices [K, H, W] float16, z [K])`` queues a volume in the open
    shard; whenever a shard fills up it is committed together with the index. A record with the key (path,
    volume_index) of a stored volume replaces it when committed.
    """

    def __init__(self, root, preprocessing: dict, height: int, width: int,
                 shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.root = Path(root)
        self.preprocessing = normalised_config(preprocessing)
        self.height, self.width = int(height), int(width)
        self.slice_bytes = self.height * self.width * PIXEL_DTYPE.itemsize
        self.shard_capacity = max(1, shard_bytes // self.slice_bytes)
        self._lock = self._acquire_lock()
        self._volumes: dict[tuple, tuple[dict, np.ndarray]] = {}   # key -> (volumes.csv row, [K] z), in order
        self._shards: list[int] = []
        self._generation = 0
        self._load_existing()
        self._remove_leftovers()
        self._pending: list[tuple[tuple, dict, np.ndarray]] = []   # volumes in the open shard
        self._open_shard: _ShardFile | None = None
        self._dirty = not (self.root / STORE_JSON).exists()

    def _acquire_lock(self):
        (self.root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        lock = open(self.root / LOCK_FILE, "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise InputError(self.root, "another braindino prepare is writing to this store",
                             "wait for it to finish, or choose another --out folder")
        return lock

    def _load_existing(self) -> None:
        if not (self.root / STORE_JSON).exists():
            return
        meta = read_meta(self.root)
        stored = {"preprocessing": meta["preprocessing"], "height": meta["height"], "width": meta["width"]}
        wanted = {"preprocessing": self.preprocessing, "height": self.height, "width": self.width}
        if stored != wanted:
            differences = ", ".join(f"{name} {stored['preprocessing'].get(name)!r} (asked {value!r})"
                                    for name, value in self.preprocessing.items()
                                    if stored["preprocessing"].get(name) != value)
            raise InputError(self.root / STORE_JSON, f"store was prepared with different preprocessing: "
                             f"{differences or 'slice size differs'}", "rerun with the store's options, or "
                             "choose a new --out folder")
        volumes = read_volumes(self.root, meta)
        table = open_slice_table(self.root, meta)
        for row in volumes.to_dict("records"):
            first, count = int(row["first_slice"]), int(row["n_slices"])
            key = volume_key(row["path"], row["volume_index"])
            self._volumes[key] = row, np.array(table["z"][first:first + count], dtype=np.int32)
        self._shards = [int(entry["n_slices"]) for entry in meta["shards"]]
        self._generation = int(meta["index"].rsplit("-", 1)[1])

    def _remove_leftovers(self) -> None:
        """Delete what an interrupted writer left: ``*.tmp`` shards and index folders, unreferenced shards."""
        referenced = {shard_file(n).rsplit("/", 1)[1] for n in range(len(self._shards))}
        for path in (self.root / SHARDS_DIR).glob("shard-*"):
            if path.name not in referenced:
                path.unlink()
        current = index_dir_name(self._generation)
        for path in self.root.glob("index-*"):
            if path.is_dir() and path.name != current:
                shutil.rmtree(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        """Commit what was added, also when leaving on an error or Ctrl-C: every added volume is complete."""
        try:
            self.commit()
        finally:
            self._lock.close()

    @property
    def n_slices(self) -> int:
        """Slices in the committed index."""
        return int(sum(len(z) for _, z in self._volumes.values()))

    def stored_hash(self, key) -> str | None:
        """Content hash of the committed volume with this key, or None when it is not stored."""
        return self._volumes[key][0]["content_hash"] if key in self._volumes else None

    def stored_hashes(self) -> dict[tuple, str]:
        """{key: content hash} of every committed volume."""
        return {key: row["content_hash"] for key, (row, _) in self._volumes.items()}

    def copy_volume(self, source_key, record: dict) -> None:
        """Store the volume ``record`` (path, volume_index and metadata columns) with the slices of the committed
        volume ``source_key`` (same file content under a new path): both rows then point at the same shard rows."""
        source_row, z = self._volumes[source_key]
        key = volume_key(record["path"], record.get("volume_index"))
        self._volumes.pop(key, None)
        self._volumes[key] = {**source_row, **record, "volume_id": volume_id(key), "path": key[0],
                              "volume_index": key[1]}, z
        self._dirty = True

    def update_volume(self, key, fields: dict) -> None:
        """Overwrite columns (manifest metadata, labels) of a committed volume."""
        row = self._volumes[key][0]
        if not all(_same_value(row.get(name), value) for name, value in fields.items()):
            row.update(fields)
            self._dirty = True

    def drop_volume(self, key) -> None:
        """Remove a committed volume from the index (its slices become dead space in their shard)."""
        if self._volumes.pop(key, None) is not None:
            self._dirty = True

    def add_volume(self, record: dict, slices: np.ndarray, z: np.ndarray) -> None:
        """Queue one volume: ``record`` holds path, volume_index and any metadata columns;
        ``slices`` is [K, height, width] float16, ``z`` is [K] slice positions along Z."""
        if slices.ndim != 3 or slices.shape[1:] != (self.height, self.width) or len(z) != len(slices):
            raise ValueError(f"slices of shape {slices.shape} with {len(z)} z indices do not fit a "
                             f"{self.height}x{self.width} store")
        if self._open_shard is not None and self._open_shard.rows + len(slices) > self.shard_capacity:
            self.commit()
        if self._open_shard is None:
            self._open_shard = _ShardFile(self.root, len(self._shards), self.slice_bytes)
        key = volume_key(record["path"], record.get("volume_index"))
        start = self._open_shard.append(slices)
        row = {"volume_id": volume_id(key), **record, "path": key[0], "volume_index": key[1],
               "shard": self._open_shard.number, "shard_start": start, "n_slices": len(slices)}
        self._pending.append((key, row, np.asarray(z, dtype=np.int32)))

    def commit(self) -> None:
        """Finish the open shard, then publish the index and store.json (the commit point)."""
        if self._open_shard is not None:
            self._open_shard.finish()
            self._shards.append(self._open_shard.rows)
            self._open_shard = None
            for key, row, z in self._pending:
                self._volumes.pop(key, None)
                self._volumes[key] = row, z
            self._pending = []
            self._dirty = True
        if not self._dirty:
            return
        self._generation += 1
        name = index_dir_name(self._generation)
        self._write_index(name)
        _write_json_durably(self.root / STORE_JSON, {
            "format_version": FORMAT_VERSION, "preprocessing": self.preprocessing,
            "height": self.height, "width": self.width, "dtype": "float16", "index": name,
            "n_volumes": len(self._volumes), "n_slices": self.n_slices,
            "shards": [{"file": shard_file(n), "n_slices": rows} for n, rows in enumerate(self._shards)]})
        self._remove_leftovers()
        self._dirty = False

    def _write_index(self, name: str) -> None:
        rows = [row for row, _ in self._volumes.values()]
        z_arrays = [z for _, z in self._volumes.values()]
        counts = np.array([len(z) for z in z_arrays], dtype=np.int64)
        first = np.cumsum(counts) - counts
        volumes = pd.DataFrame(rows)
        if volumes.empty:
            volumes = pd.DataFrame(columns=IDENTITY_COLUMNS + STORE_COLUMNS)
        volumes["first_slice"] = first
        volumes["volume_index"] = volumes["volume_index"].astype("Int64")
        manifest_columns = [c for c in volumes.columns if c not in RESERVED_COLUMNS]
        volumes = volumes.reindex(columns=IDENTITY_COLUMNS + manifest_columns + STORE_COLUMNS)
        table = np.empty(int(counts.sum()), dtype=SLICE_DTYPE)
        table["volume"] = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        table["z"] = np.concatenate(z_arrays) if z_arrays else np.empty(0, np.int32)
        tmp = self.root / f"{name}.tmp"
        tmp.mkdir()
        volumes.to_csv(tmp / VOLUMES_CSV, index=False)
        with open(tmp / SLICES_NPY, "wb") as f:
            np.save(f, table)
        for path in (tmp / VOLUMES_CSV, tmp / SLICES_NPY):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, self.root / name)
        _fsync_dir(self.root)


def shard_row_count(root, meta: dict, shard: int) -> int:
    """Rows of a committed shard, checked against the file size (a damaged shard raises InputError)."""
    rows = int(meta["shards"][shard]["n_slices"])
    path = Path(root) / meta["shards"][shard]["file"]
    expected = rows * int(meta["height"]) * int(meta["width"]) * PIXEL_DTYPE.itemsize
    size = path.stat().st_size if path.exists() else -1
    if size != expected:
        raise InputError(path, f"shard has {max(size, 0)} bytes, store.json promises {expected}",
                         "the store was damaged outside braindino; prepare it again into a new folder")
    return rows

