"""Read-only, random access to the slices of a store (layout: :mod:`braindino.store.format`).

``SliceStore`` is a map-style dataset without torch: ``store[i]`` is the ``[H, W]`` float16 slice ``i``. Files
are memory-mapped, so memory use does not grow with the store; they are opened lazily in each process (the
process id is checked on every access), and pickling drops open handles, so a store can be handed to DataLoader
workers (fork or spawn) and used by every rank of a torchrun job at once. A store shows what was committed when
it was opened; do not read a store while ``braindino prepare`` is appending to it (open it again afterwards).

Damage is caught where it is read: slices are read with ``pread`` (never through a memory map, where a file
truncated under a running job would kill the process with SIGBUS), and every read checks that its shard or slice
table is still the file the store was opened with (same inode, size and modification time: committed files never
change) and that the slice holds no NaN/Inf. A damaged file raises ``InputError`` naming it, so a training run
stops before a step sees garbage.
"""

import json
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
    """A committed store file read with ``pread``; every read checks that the file is unchanged since the store
    was opened (committed files are never modified) and complete."""

    def __init__(self, path: Path, signature: tuple):
        self.path = path
        self.signature = signature
        try:
            self.descriptor = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise InputError(path, f"cannot open store file ({err.strerror})", GONE_HINT) from None
        self._check(self.signature_of(os.fstat(self.descriptor)), "was replaced or changed")

    @staticmethod
    def signature_of(stat: os.stat_result) -> tuple:
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _check(self, now: tuple, what: str) -> None:
        if now != self.signature:
            raise InputError(self.path, f"file {what} while this run was reading it (size {self.signature[1]} -> "
                             f"{now[1]} bytes)", DAMAGED_HINT)

    def read_into(self, buffer: np.ndarray, offset: int) -> None:
        """Fill ``buffer`` (C-contiguous) with the file's bytes from ``offset``."""
        if hasattr(os, "preadv"):
            count = os.preadv(self.descriptor, [buffer], offset)
        else:   # platforms without preadv: one extra copy
            data = os.pread(self.descriptor, buffer.nbytes, offset)
            buffer.reshape(-1).view(np.uint8)[:len(data)] = np.frombuffer(data, np.uint8)
            count = len(data)
        self._check(self.signature_of(os.fstat(self.descriptor)), "was truncated or overwritten")
        if count != buffer.nbytes:
            raise InputError(self.path, f"file ends at byte {offset + count}, {offset + buffer.nbytes} expected",
                             DAMAGED_HINT)

    def close(self) -> None:
        os.close(self.descriptor)


def _all_finite(pixels: np.ndarray) -> bool:
    """Whether a float16 array holds no NaN/Inf, from its bits: a float16 is non-finite exactly when its exponent
    bits are all ones, i.e. its magnitude bits are >= 0x7C00 (7x faster than ``np.isfinite`` on float16, which
    has no vectorised kernel; this check runs on every slice read)."""
    return int((pixels.view("<u2") & 0x7FFF).max()) < 0x7C00


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
        self._table_offset = self._record_files()
        self._pid = None
        self._drop_handles()

    def _record_files(self) -> int:
        """Remember what every committed file looks like now; returns the byte offset of the slice table's data."""
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
        return offset

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

    def _checked(self, path: Path) -> _CheckedFile:
        if path not in self._signatures:
            raise InputError(path, "store file is missing", DAMAGED_HINT)
        return _CheckedFile(path, self._signatures[path])

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
            handle = self._files[shard] = self._checked(self.root / self._meta["shards"][shard]["file"])
        return handle, self._rows[shard]

    def _slice_table(self) -> np.ndarray:
        """The whole [N] slice table, memory-mapped (for bulk readers of ``slice_volume`` / ``slice_z``)."""
        self._open_here()
        if self._table is None:
            self._table = open_slice_table(self.root, self._meta)
        return self._table

    def __len__(self) -> int:
        return self._length

    def _check_index(self, i) -> int:
        i = operator.index(i)
        if not -self._length <= i < self._length:
            raise IndexError(f"slice index {i} out of range for a store of {self._length} slices")
        return i % self._length

    def __getitem__(self, i: int) -> np.ndarray:
        """Slice ``i`` as a fresh ``[height, width]`` float16 array (rows = R axis, cols = A axis)."""
        i = self._check_index(i)
        self._open_here()
        entry = np.empty(1, dtype=SLICE_DTYPE)
        self._table_file.read_into(entry, self._table_offset + i * SLICE_DTYPE.itemsize)
        volume = int(entry["volume"][0])
        if not 0 <= volume < len(self._first_slice) or not 0 <= i - self._first_slice[volume] < self._n_slices[volume]:
            raise InputError(self._table_file.path, f"slice {i} points at volume row {volume}, which does not hold "
                             f"it", DAMAGED_HINT)
        shard, row = int(self._shard[volume]), int(self._shard_start[volume] + i - self._first_slice[volume])
        handle, rows = self._shard_file(shard)
        if not 0 <= row < rows:
            raise InputError(handle.path, f"row {row} is past the shard's {rows} slices", DAMAGED_HINT)
        pixels = np.empty((self.height, self.width), dtype=PIXEL_DTYPE)
        handle.read_into(pixels, row * pixels.nbytes)
        if not _all_finite(pixels):
            raise InputError(handle.path, f"slice at row {row} holds NaN/Inf values", DAMAGED_HINT)
        return pixels

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
