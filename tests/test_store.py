"""Slice store format and reader, on stores built from in-memory arrays with the low-level StoreBuilder."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from braindino.errors import InputError
from braindino.store import SliceStore
from braindino.store.format import FORMAT_VERSION, StoreBuilder, shard_file, volume_id, volume_key

SIZE = 8
PREPROCESSING = {"size": SIZE, "spacing_mm": 1.0}
SLICE_BYTES = SIZE * SIZE * 2


def make_volume(seed: int, n_slices: int):
    """[K, 8, 8] float16 slices whose values identify the volume, and their z positions."""
    rng = np.random.default_rng(seed)
    slices = rng.random((n_slices, SIZE, SIZE)).astype(np.float16)
    z = np.sort(rng.choice(100, size=n_slices, replace=False)).astype(np.int32)
    return slices, z


def build(root, volumes: dict, shard_slices: int = 1000):
    """Write ``volumes`` {path: (slices, z, labels)} with shards of at most ``shard_slices`` slices."""
    with StoreBuilder(root, PREPROCESSING, SIZE, SIZE, shard_bytes=shard_slices * SLICE_BYTES) as builder:
        for path, (slices, z, labels) in volumes.items():
            builder.add_volume({"path": path, "volume_index": None, "content_hash": f"hash-{path}", **labels},
                               slices, z)


@pytest.fixture
def cohort():
    """Five volumes of 3..7 slices with subject, sequence and age labels."""
    volumes = {}
    for index, n_slices in enumerate([3, 7, 4, 5, 6]):
        slices, z = make_volume(index, n_slices)
        volumes[f"/data/sub-{index // 2}/vol{index}.nii.gz"] = (
            slices, z, {"subject": f"{index // 2:03d}", "sequence": "T1" if index % 2 else "FLAIR",
                        "age": 50.5 + index})
    return volumes


def expected_slices(volumes):
    return np.concatenate([slices for slices, _, _ in volumes.values()])


def test_random_access_across_shard_boundaries(tmp_path, cohort):
    build(tmp_path / "store", cohort, shard_slices=8)
    store = SliceStore(tmp_path / "store")
    expected = expected_slices(cohort)
    meta = json.loads((tmp_path / "store" / "store.json").read_text())
    assert len(meta["shards"]) >= 3                      # capacity 8 forces several shards
    assert all(entry["n_slices"] <= 8 for entry in meta["shards"][:-1])
    assert len(store) == len(expected) == 25
    order = np.random.default_rng(0).permutation(len(store))
    for i in order:
        item = store[int(i)]
        assert item.dtype == np.float16 and item.shape == (SIZE, SIZE)
        np.testing.assert_array_equal(item, expected[i])
    np.testing.assert_array_equal(store[-1], expected[-1])
    with pytest.raises(IndexError):
        store[len(store)]


def test_volume_never_spans_shards(tmp_path, cohort):
    build(tmp_path / "store", cohort, shard_slices=8)
    store = SliceStore(tmp_path / "store")
    meta = json.loads((tmp_path / "store" / "store.json").read_text())
    for row in store.volumes.itertuples():
        assert row.shard_start + row.n_slices <= meta["shards"][row.shard]["n_slices"]


def test_index_tables(tmp_path, cohort):
    build(tmp_path / "store", cohort)
    store = SliceStore(tmp_path / "store")
    paths = list(cohort)
    assert store.volumes["path"].tolist() == paths
    assert store.volumes["subject"].tolist() == ["000", "000", "001", "001", "002"]   # stays a string
    assert store.volumes["age"].tolist() == [50.5, 51.5, 52.5, 53.5, 54.5]
    assert store.volumes["volume_id"].tolist() == [volume_id(volume_key(p, None)) for p in paths]
    assert store.volumes["volume_id"].is_unique
    counts = [len(z) for _, z, _ in cohort.values()]
    np.testing.assert_array_equal(store.slice_volume, np.repeat(np.arange(5), counts))
    np.testing.assert_array_equal(store.slice_z, np.concatenate([z for _, z, _ in cohort.values()]))
    assert isinstance(store.slice_volume, np.memmap)
    for row, path in enumerate(paths):
        slices, z, labels = cohort[path]
        indices = store.volume_slices(row)
        assert len(indices) == len(z)
        np.testing.assert_array_equal(np.stack([store[i] for i in indices]), slices)
        info = store.slice_info(indices[-1])
        assert (info["path"], info["z"], info["volume_row"]) == (path, z[-1], row)
        assert (info["subject"], info["sequence"], info["age"]) == (labels["subject"], labels["sequence"],
                                                                    labels["age"])
        assert info["volume_index"] is None


def test_label_columns_named_like_slice_fields_do_not_override_them(tmp_path, cohort):
    """Labels z / index / volume_row stay in ``volumes`` but slice_info reports the slice's own values."""
    labelled = {path: (slices, z, {**labels, "z": 999, "index": -1, "volume_row": 42})
                for path, (slices, z, labels) in cohort.items()}
    build(tmp_path / "store", labelled)
    store = SliceStore(tmp_path / "store")
    assert store.volumes["z"].tolist() == [999] * 5 and store.volumes["volume_row"].tolist() == [42] * 5
    global_index = 0
    for row, (slices, z, labels) in enumerate(labelled.values()):
        for position in range(len(z)):
            info = store.slice_info(global_index)
            assert (info["index"], info["volume_row"], info["z"]) == (global_index, row, z[position])
            assert info["age"] == labels["age"]
            global_index += 1


def test_items_are_copies(tmp_path, cohort):
    build(tmp_path / "store", cohort)
    store = SliceStore(tmp_path / "store")
    item = store[3]
    item[:] = 7
    np.testing.assert_array_equal(store[3], expected_slices(cohort)[3])


def test_append_and_replace(tmp_path, cohort):
    paths = list(cohort)
    build(tmp_path / "store", dict(list(cohort.items())[:3]))
    new_slices, new_z = make_volume(99, 2)
    with StoreBuilder(tmp_path / "store", PREPROCESSING, SIZE, SIZE) as builder:
        assert builder.stored_hash(volume_key(paths[1], None)) == f"hash-{paths[1]}"
        assert builder.stored_hash(volume_key(paths[4], None)) is None
        builder.add_volume({"path": paths[1], "content_hash": "new", "subject": "000"}, new_slices, new_z)
        for path in paths[3:]:
            slices, z, labels = cohort[path]
            builder.add_volume({"path": path, "content_hash": "h", **labels}, slices, z)
    store = SliceStore(tmp_path / "store")
    assert store.volumes["path"].tolist() == [paths[0], paths[2], paths[1], paths[3], paths[4]]
    assert len(store) == 3 + 4 + 2 + 5 + 6
    replaced = store.volume_slices(2)
    np.testing.assert_array_equal(np.stack([store[i] for i in replaced]), new_slices)
    assert store.volumes["content_hash"].iat[2] == "new"
    assert len(list((tmp_path / "store").glob("index-*"))) == 1   # older index generations removed


def test_copy_volume_reuses_stored_slices_under_a_new_key(tmp_path, cohort):
    paths = list(cohort)
    build(tmp_path / "store", cohort)
    with StoreBuilder(tmp_path / "store", PREPROCESSING, SIZE, SIZE) as builder:
        assert builder.stored_hashes()[volume_key(paths[1], None)] == f"hash-{paths[1]}"
        builder.copy_volume(volume_key(paths[1], None), {"path": "/moved/vol1.nii.gz", "subject": "new"})
        builder.drop_volume(volume_key(paths[1], None))
    store = SliceStore(tmp_path / "store")
    assert store.volumes["path"].tolist() == [paths[0], *paths[2:], "/moved/vol1.nii.gz"]
    moved = store.volumes.iloc[-1]
    assert (moved["subject"], moved["sequence"], moved["content_hash"]) == ("new", "T1", f"hash-{paths[1]}")
    assert moved["volume_id"] == volume_id(volume_key("/moved/vol1.nii.gz", None))
    slices, z, _ = cohort[paths[1]]
    np.testing.assert_array_equal(np.stack([store[i] for i in store.volume_slices(4)]), slices)
    np.testing.assert_array_equal(store.slice_z[list(store.volume_slices(4))], z)
    assert len(store) == 25 and json.loads((tmp_path / "store" / "store.json").read_text())["n_volumes"] == 5


def test_pickled_store_in_dataloader_workers(tmp_path, cohort):
    build(tmp_path / "store", cohort, shard_slices=8)
    store = SliceStore(tmp_path / "store")
    _ = store[0], store.slice_volume                      # handles are open in this process now
    state_size = len(pickle.dumps(store))
    assert state_size < 20_000                           # metadata only: no slices, no memmaps
    loader = torch.utils.data.DataLoader(store, batch_size=4, num_workers=2, shuffle=False)
    batches = torch.cat(list(loader))
    np.testing.assert_array_equal(batches.numpy(), expected_slices(cohort))


def test_version_and_config_mismatch_refused(tmp_path, cohort):
    build(tmp_path / "store", cohort)
    with pytest.raises(InputError, match="different preprocessing.*size 8 \\(asked 16\\)"):
        StoreBuilder(tmp_path / "store", {"size": 16, "spacing_mm": 1.0}, 16, 16)
    meta_path = tmp_path / "store" / "store.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(InputError, match="format version 2 is not supported"):
        SliceStore(tmp_path / "store")
    with pytest.raises(InputError, match="format version"):
        StoreBuilder(tmp_path / "store", PREPROCESSING, SIZE, SIZE)


def test_not_a_store(tmp_path):
    with pytest.raises(InputError, match="not a slice store"):
        SliceStore(tmp_path)


def test_second_writer_refused(tmp_path, cohort):
    with StoreBuilder(tmp_path / "store", PREPROCESSING, SIZE, SIZE):
        with pytest.raises(InputError, match="another braindino prepare is writing"):
            StoreBuilder(tmp_path / "store", PREPROCESSING, SIZE, SIZE)


def test_empty_store(tmp_path):
    build(tmp_path / "store", {})
    store = SliceStore(tmp_path / "store")
    assert len(store) == 0 and len(store.volumes) == 0


def test_damaged_shard_reported(tmp_path, cohort):
    build(tmp_path / "store", cohort)
    with open(tmp_path / "store" / shard_file(0), "r+b") as f:
        f.truncate(SLICE_BYTES)
    with pytest.raises(InputError, match="store.json promises"):
        SliceStore(tmp_path / "store")[0]


CRASHING_WRITER = """
import os, sys
import numpy as np
from braindino.store.format import StoreBuilder
builder = StoreBuilder(sys.argv[1], {"size": 8, "spacing_mm": 1.0}, 8, 8, shard_bytes=4 * 128)
for seed in range(3):   # 4 slices each, one shard each: volumes 0 and 1 are committed when 1 and 2 are added
    builder.add_volume({"path": f"/v{seed}", "content_hash": "h"}, np.full((4, 8, 8), seed, np.float16),
                       np.arange(4))
os._exit(1)             # dies like SIGKILL: no commit, no cleanup, volume 2 left in a .tmp shard
"""


def test_killed_writer_leaves_readable_store(tmp_path):
    root = tmp_path / "store"
    result = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(root)], capture_output=True, text=True, encoding="utf-8")
    assert result.returncode == 1, result.stderr
    assert (root / "shards" / "shard-00002.f16.tmp").exists()
    store = SliceStore(root)
    assert store.volumes["path"].tolist() == ["/v0", "/v1"]
    assert [float(store[i][0, 0]) for i in range(len(store))] == [0] * 4 + [1] * 4
    (root / "index-000099.tmp").mkdir()                  # a half-written index folder is ignored too
    assert len(SliceStore(root)) == 8
    with StoreBuilder(root, {"size": 8, "spacing_mm": 1.0}, 8, 8) as builder:
        builder.add_volume({"path": "/v2", "content_hash": "h"}, np.full((4, 8, 8), 2, np.float16), np.arange(4))
    leftovers = [p.name for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    store = SliceStore(root)
    assert [float(store[i][0, 0]) for i in range(len(store))] == [0] * 4 + [1] * 4 + [2] * 4
    assert pd.read_csv(root / json.loads((root / "store.json").read_text())["index"] / "volumes.csv")[
        "path"].tolist() == ["/v0", "/v1", "/v2"]


def test_batched_reads_equal_single_reads_in_any_order_across_shards(tmp_path, cohort):
    build(tmp_path / "store", cohort, shard_slices=8)
    store = SliceStore(tmp_path / "store")
    expected = expected_slices(cohort)
    rng = np.random.default_rng(1)
    for indices in [rng.permutation(len(store)), rng.integers(0, len(store), 40), np.array([3, 3, -1, 0]),
                    np.array([], dtype=np.int64)]:
        batch = store.read_slices(indices)
        assert batch.dtype == np.float16 and batch.shape == (len(indices), SIZE, SIZE) and batch.flags.owndata
        np.testing.assert_array_equal(batch, expected[indices] if len(indices) else expected[:0])
    with pytest.raises(IndexError, match="25 out of range"):
        store.read_slices([0, 25])


def test_finite_check_agrees_with_isfinite_on_every_float16_bit_pattern():
    from braindino.store.reader import _all_finite
    patterns = np.arange(65536, dtype=np.uint16)
    values = patterns.view(np.float16)
    verdicts = np.array([_all_finite(values[k:k + 1]) for k in range(65536)])
    np.testing.assert_array_equal(verdicts, np.isfinite(values))
    background = np.random.default_rng(0).random((4, 64, 64)).astype(np.float16)   # [0, 1): the fast path
    assert _all_finite(background) and _all_finite(-background)
    for bits in (0x7C00, 0xFC00, 0x7E00, 0xFFFF):   # +Inf, -Inf, NaN, NaN with the sign bit, anywhere in a batch
        damaged = background.copy()
        damaged.view(np.uint16)[2, 17, 5] = bits
        assert not _all_finite(damaged) and not _all_finite(-damaged)


TRUNCATE_THEN_READ = """
import sys
from pathlib import Path
from braindino.errors import InputError
from braindino.store import SliceStore
store = SliceStore(sys.argv[1])
store.read_slices([0, 1])               # maps the shard
shard = Path(sys.argv[1]) / "shards" / "shard-00000.f16"
with open(shard, "r+b") as file:
    file.truncate(0)
try:
    store.read_slices([0, 20])           # pages that are gone: SIGBUS if the map were touched before the check
except InputError as err:
    print(err)
"""


def test_a_shard_truncated_after_it_was_mapped_is_named_not_a_sigbus(tmp_path, cohort):
    build(tmp_path / "store", cohort)
    result = subprocess.run([sys.executable, "-c", TRUNCATE_THEN_READ, str(tmp_path / "store")],
                            capture_output=True, text=True, encoding="utf-8")
    assert result.returncode == 0, (result.returncode, result.stderr[-1500:])
    assert result.stdout.startswith(f"{tmp_path / 'store' / shard_file(0)}: file was truncated or overwritten")


class _TruncatesInsideTheWindow(torch.utils.data.Dataset):
    """Reads a store in a worker the way a truncation inside the SIGBUS window does: the shard shrinks after the
    batch's first check, and the copy touches pages that are gone (a real SIGBUS kills the worker)."""

    def __init__(self, store):
        self.store = store

    def __len__(self):
        return 1

    def __getitem__(self, i):
        self.store.read_slices([0])
        handle, _ = self.store._shard_file(0)
        with open(handle.path, "r+b") as file:
            file.truncate(0)
        return np.array(handle.pixels[-1])


def test_a_worker_killed_by_sigbus_names_the_truncated_shard(tmp_path, cohort):
    from braindino.train.data import batches_checked_against
    build(tmp_path / "store", cohort)
    store = SliceStore(tmp_path / "store")
    loader = torch.utils.data.DataLoader(_TruncatesInsideTheWindow(store), batch_size=None, num_workers=1)
    with pytest.raises(InputError) as err:
        list(batches_checked_against(loader, store))
    assert str(err.value).startswith(f"{tmp_path / 'store' / shard_file(0)}: file was truncated or overwritten")
