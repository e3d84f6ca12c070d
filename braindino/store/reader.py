"""Read-only, random access to the slices of a store (layout: :mod:`braindino.store.format`).

``SliceStore`` is a map-style dataset without torch: ``store[i]`` is the ``[H, W]`` float16 slice ``i``. Files
are memory-mapped, so memory use does not grow with the store; they are opened lazily in each process (the
process id is checked on every access), and pickling drops open handles, so a store can be handed to DataLoader
workers (fork or spawn) and used by every rank of a torchrun job at once. A store shows what was committed when
it was opened; do not read a store while ``braindino prepare`` is appending to it (open it again afterwards).

Damage is caught where it is read. ``read_slices`` (what the training loader calls once per step; ``store[i]`` is
a batch of one) checks every file the batch needs *before* it touches a page (same inode, size and modification
time as when the store was opened: committed files never change), copies the slices out of the shards' memory
maps, checks the files again, and checks the batch for NaN/Inf. A damaged file raises ``InputError`` naming it,
so a training run stops before a step sees garbage.

The SIGBUS window: reading a memory map past the end of a file truncated *after* the first check kills the
process with SIGBUS. The window is the copy of one batch (about 0.3 ms for 64 slices of 224²), once per step; a
truncation at any other moment is an error line naming the file. When a DataLoader worker dies there, the trainer
asks ``check_files()``, which names the changed file. Closing the window (``pread`` of every slice instead of a
copy out of the map) costs a fifth of the read rate (README, Performance).
"""

import json
import mmap
import operator
import os
from pathlib import Path

import numpy as np
import pandas as pd

from braindino.errors import InputError
from braindino.store.format import (PIXEL_DTYPE, SLICE_DTYPE, SLICES_NPY, open_slice_table, read_meta, read_volumes,
                                    shard_row_count)

DAMAGED_HINT = "the store was damaged outside braindino; prepare it again into a new folder"
GONE_HINT = ("the store was changed (by braindino prepare?) or moved while this run read it; start the run again on "
             "the store as it is now")


class _CheckedFile:
    """A committed store file, open read-only, and (for a shard) memory-mapped as ``[rows, height, width]``.

    ``check()`` raises ``InputError`` naming the file when it is no longer the file the store was opened with
    (committed files are never modified): call it before and after touching the map.
    """

    def __init__(self, path: Path, signature: tuple, slice_shape: tuple[int, int] | None = None):
        self.path = path
        self.signature = signature
        try:
            self.descriptor = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise InputError(path, f"cannot open store file ({err.strerror})", GONE_HINT) from None
        self._check(self.signature_of(os.fstat(self.descriptor)), "was replaced or changed")
        self.pixels = None   # [rows, height, width] float16 view of the memory map (shards with rows only)
        if slice_shape is not None and signature[1] > 0:
            self._map = mmap.mmap(self.descriptor, signature[1], prot=mmap.PROT_READ)
            self.pixels = np.frombuffer(self._map, dtype=PIXEL_DTYPE).reshape(-1, *slice_shape)

    @staticmethod
    def signature_of(stat: os.stat_result) -> tuple:
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _check(self, now: tuple, what: str) -> None:
        if now != self.signature:
            raise InputError(self.path, f"file {what} while this run was reading it (size {self.signature[1]} -> "
                             f"{now[1]} bytes)", DAMAGED_HINT)

    def check(self) -> None:
        self._check(self.signature_of(os.fstat(self.descriptor)), "was truncated or overwritten")

    def close(self) -> None:
        self.pixels = None
        if getattr(self, "_map", None) is not None:
            self._map.close()
        os.close(self.descriptor)


def _all_finite(pixels: np.ndarray) -> bool:
    """Whether a float16 array holds no NaN/Inf, from its bits, without a temporary. A float16 is non-finite
    exactly when its bits read as int16 are >= 0x7C00 (positive) or as uint16 are >= 0xFC00 (negative). One
    reduction decides for stores of non-negative values (uint16 max < 0x7C00: no sign bit, no all-ones exponent),
    the second only runs when the first cannot. Several times faster than ``np.isfinite`` on float16."""
    if int(pixels.view("<u2").max(initial=0)) < 0x7C00:
        return True
    return int(pixels.view("<i2").max(initial=0)) < 0x7C00 and int(pixels.view("<u2").max(initial=0)) < 0xFC00


class SliceStore:
    """Slices of a prepared store, addressed by global index ``0 <= i < len(store)``.

    Attributes: ``volumes`` (DataFrame, one row per volume, manifest labels included), ``height``, ``width``,
    ``preprocessing`` (the config the slices were made with, as a dict), ``slice_volume`` ([N] int32 volume row
    of every slice, memory-mapped) and ``slice_z`` ([N] int32 slice position along Z of its canonical volume).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta = read_meta(self.root)
        self._meta = meta
        self.height, self.width = int(meta["height"]), int(meta["width"])
        self.preprocessing = meta["preprocessing"]
        self.volumes = read_volumes(self.root, meta)
        self._length = int(meta["n_slices"])
        self._first_slice = self.volumes["first_slice"].to_numpy(np.int64)
        self._shard = self.volumes["shard"].to_numpy(np.int64)
        self._shard_start = self.volumes["shard_start"].to_numpy(np.int64)
        self._n_slices = self.volumes["n_slices"].to_numpy(np.int64)
        self._signatures = {}   # file -> (inode, size, mtime) when the store was opened
        self._record_files()
        self._pid = None
        self._drop_handles()

    def _record_files(self) -> None:
        """Remember what every committed file looks like now, and check the slice table's header and size."""
        files = [self.root / self._meta["index"] / SLICES_NPY] + [self.root / entry["file"]
                                                                   for entry in self._meta["shards"]]
        for path in files:
            if path.exists():   # a missing shard is reported, with its size, when first read
                self._signatures[path] = _CheckedFile.signature_of(path.stat())
        with open(files[0], "rb") as table:
            version = np.lib.format.read_magic(table)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(table) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(table))
            offset = table.tell()
        expected = offset + self._length * SLICE_DTYPE.itemsize
        if dtype != SLICE_DTYPE or shape != (self._length,) or files[0].stat().st_size != expected:
            raise InputError(files[0], f"slice table does not match store.json ({files[0].stat().st_size} bytes, "
                             f"{expected} expected)", DAMAGED_HINT)

    def _drop_handles(self) -> None:
        if self._pid == os.getpid():
            for handle in [getattr(self, "_table_file", None), *getattr(self, "_files", {}).values()]:
                if handle is not None:
                    handle.close()
        self._pid = None
        self._table = None
        self._table_file = None
        self._files: dict[int, _CheckedFile] = {}
        self._rows: dict[int, int] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=None, _table=None, _table_file=None, _files={}, _rows={})
        return state

    def _checked(self, path: Path, slice_shape: tuple[int, int] | None = None) -> _CheckedFile:
        if path not in self._signatures:
            raise InputError(path, "store file is missing", DAMAGED_HINT)
        return _CheckedFile(path, self._signatures[path], slice_shape)

    def _open_here(self) -> None:
        """(Re)open this process's handles: lazily, and again in a worker process (file offsets are per process)."""
        if self._pid != os.getpid():
            self._drop_handles()
            self._table_file = self._checked(self.root / self._meta["index"] / SLICES_NPY)
            self._pid = os.getpid()

    def _shard_file(self, shard: int) -> tuple[_CheckedFile, int]:
        handle = self._files.get(shard)
        if handle is None:
            self._rows[shard] = shard_row_count(self.root, self._meta, shard)   # checks its size against store.json
            handle = self._files[shard] = self._checked(self.root / self._meta["shards"][shard]["file"],
                                                        (self.height, self.width))
        return handle, self._rows[shard]

    def _slice_table(self) -> np.ndarray:
        """The whole [N] slice table, memory-mapped (for bulk readers of ``slice_volume`` / ``slice_z``)."""
        self._open_here()
        if self._table is None:
            self._table = open_slice_table(self.root, self._meta)
        return self._table

    def __len__(self) -> int:
        return self._length

    def check_files(self) -> None:
        """Raise ``InputError`` naming the first committed file that is no longer what it was when the store was
        opened (removed, replaced, truncated or rewritten); do nothing if every file is intact."""
        for path, signature in self._signatures.items():
            try:
                now = _CheckedFile.signature_of(path.stat())
            except FileNotFoundError:
                raise InputError(path, "store file was removed while this run was reading it", GONE_HINT) from None
            if now != signature:
                raise InputError(path, f"file was truncated or overwritten while this run was reading it (size "
                                 f"{signature[1]} -> {now[1]} bytes)", DAMAGED_HINT)

    def _check_index(self, i) -> int:
        i = operator.index(i)
        if not -self._length <= i < self._length:
            raise IndexError(f"slice index {i} out of range for a store of {self._length} slices")
        return i % self._length

    def __getitem__(self, i: int) -> np.ndarray:
        """Slice ``i`` as a fresh ``[height, width]`` float16 array (rows = R axis, cols = A axis)."""
        return self.read_slices([operator.index(i)])[0]

    def read_slices(self, indices) -> np.ndarray:
        """``[B, height, width]`` float16, fresh: the slices at ``indices`` (``[B]`` ints, any order, repeats
        allowed). Every file the batch needs is checked before and after the copy, the batch once for NaN/Inf."""
        indices = np.asarray(indices).reshape(-1)
        if indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"slice indices must be integers, not {indices.dtype}")
        indices = indices.astype(np.int64)
        outside = (indices < -self._length) | (indices >= self._length)
        if outside.any():
            raise IndexError(f"slice index {int(indices[outside][0])} out of range for a store of {self._length} "
                             f"slices")
        indices = indices % max(self._length, 1)
        self._open_here()
        volumes = np.searchsorted(self._first_slice, indices, side="right") - 1   # first_slice ascends
        shards = self._shard[volumes]
        rows = self._shard_start[volumes] + indices - self._first_slice[volumes]
        needed = [(int(shard), *self._shard_file(int(shard))) for shard in np.unique(shards)]
        for shard, handle, shard_rows in needed:
            handle.check()
            last = int(rows[shards == shard].max())
            if last >= shard_rows:
                raise InputError(handle.path, f"row {last} is past the shard's {shard_rows} slices", DAMAGED_HINT)
        self._table_file.check()
        if len(needed) == 1:
            out = needed[0][1].pixels[rows]   # fancy indexing: one copy out of the map
        else:
            out = np.empty((len(indices), self.height, self.width), dtype=PIXEL_DTYPE)
            for shard, handle, _ in needed:
                chosen = shards == shard
                out[chosen] = handle.pixels[rows[chosen]]
        for _, handle, _ in needed:
            handle.check()
        if not _all_finite(out):
            bad = next(k for k in range(len(out)) if not _all_finite(out[k]))
            path = self._files[int(shards[bad])].path
            raise InputError(path, f"slice at row {int(rows[bad])} holds NaN/Inf values", DAMAGED_HINT)
        return out

    @property
    def slice_volume(self) -> np.ndarray:
        """[N] int32 row in ``volumes`` of every slice (memory-mapped view)."""
        return self._slice_table()["volume"]

    @property
    def slice_z(self) -> np.ndarray:
        """[N] int32 position along Z of every slice in its canonical volume (memory-mapped view)."""
        return self._slice_table()["z"]

    def volume_slices(self, volume_row: int) -> range:
        """Global indices of the slices of volume ``volume_row`` (a row of ``volumes``), in Z order."""
        first = int(self._first_slice[volume_row])
        return range(first, first + int(self.volumes["n_slices"].iat[volume_row]))

    def slice_info(self, i: int) -> dict:
        """Metadata of slice ``i``: its volume's columns (labels included), then the slice's own ``index``,
        ``volume_row`` and ``z``, which win over label columns of the same name (those stay in ``volumes``);
        ``affine`` is returned as a [4, 4] float64 array."""
        i = self._check_index(i)
        volume = int(self.slice_volume[i])
        info = {name: (None if _is_missing(value) else value) for name, value in self.volumes.iloc[volume].items()}
        if info["affine"] is not None:
            info["affine"] = np.array(json.loads(info["affine"]), dtype=np.float64)
        info.update(index=i, volume_row=volume, z=int(self.slice_z[i]))
        return info

    def __repr__(self) -> str:
        return (f"SliceStore({str(self.root)!r}: {len(self)} slices of {self.height}x{self.width} "
                f"from {len(self.volumes)} volumes)")


def _is_missing(value) -> bool:
    return not isinstance(value, (str, list)) and bool(pd.isna(value))
