"""Read-only, random access to the slices of a store (layout: :mod:`braindino.store.format`).

``SliceStore`` is a map-style dataset without torch: ``store[i]`` is the ``[H, W]`` float16 slice ``i``. Files
are memory-mapped, so memory use does not grow with the store; they are opened lazily in each process (the
process id is checked on every access), and pickling drops open handles, so a store can be handed to DataLoader
workers (fork or spawn) and used by every rank of a torchrun job at once. A store shows what was committed when
it was opened; do not read a store while ``braindino prepare`` is appending to it (open it again afterwards).
"""

import json
import operator
import os
from pathlib import Path

import numpy as np
import pandas as pd

from braindino.store.format import PIXEL_DTYPE, open_slice_table, read_meta, read_volumes, shard_row_count


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
        self._drop_handles()

    def _drop_handles(self) -> None:
        self._pid = None
        self._table = None
        self._shards: dict[int, np.memmap] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=None, _table=None, _shards={})
        return state

    def _slice_table(self) -> np.ndarray:
        if self._pid != os.getpid():
            self._drop_handles()
            self._table = open_slice_table(self.root, self._meta)
            self._pid = os.getpid()
        return self._table

    def _shard_array(self, shard: int) -> np.memmap:
        array = self._shards.get(shard)
        if array is None:
            rows = shard_row_count(self.root, self._meta, shard)
            array = np.memmap(self.root / self._meta["shards"][shard]["file"], dtype=PIXEL_DTYPE, mode="r",
                              shape=(rows, self.height, self.width))
            self._shards[shard] = array
        return array

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
        volume = int(self._slice_table()["volume"][i])
        row = self._shard_start[volume] + i - self._first_slice[volume]
        return np.array(self._shard_array(int(self._shard[volume]))[row])

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
