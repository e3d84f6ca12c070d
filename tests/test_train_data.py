import numpy as np
import pytest

from braindino.train.data import global_batch_indices


def test_one_pass_covers_every_slice_once():
    n, batch = 40, 8
    seen = np.concatenate([global_batch_indices(step, batch, n, seed=3) for step in range(n // batch)])
    assert sorted(seen.tolist()) == list(range(n))


def test_batches_wrap_into_a_new_permutation():
    n, batch = 10, 4
    step2 = global_batch_indices(2, batch, n, seed=0)   # positions 8..11: end of pass 0, start of pass 1
    pass0 = np.random.default_rng([0, 0]).permutation(n)
    pass1 = np.random.default_rng([0, 1]).permutation(n)
    assert step2.tolist() == [pass0[8], pass0[9], pass1[0], pass1[1]]


def test_order_depends_on_seed_and_step_only():
    a = global_batch_indices(5, 16, 1000, seed=1)
    assert np.array_equal(a, global_batch_indices(5, 16, 1000, seed=1))
    assert not np.array_equal(a, global_batch_indices(5, 16, 1000, seed=2))
    assert not np.array_equal(a, global_batch_indices(6, 16, 1000, seed=1))


class NumberedSlices:
    """A stand-in store whose slice ``i`` is filled with the number ``i``, so a batch says which slices it holds."""

    def __len__(self):
        return 100

    def read_slices(self, indices):
        return np.stack([np.full((2, 2), i, dtype=np.float16) for i in indices])


def read_by(rank: int, world_size: int, step: int) -> list[int]:
    from braindino.train.data import StepBatches

    batch = StepBatches(NumberedSlices(), 16, rank, world_size, seed=0)[step]
    slices = batch.slices if hasattr(batch, "slices") else batch
    return slices[:, 0, 0, 0].int().tolist()


@pytest.mark.parametrize("world_size", [2, 4])
def test_process_shares_partition_the_global_batch(world_size):
    """Each process reads its own contiguous part of the step's global batch; the parts, in rank order, are exactly
    what one process reads (so the data order is the same at any world size)."""
    for step in (0, 7):
        alone = read_by(0, 1, step)
        parts = [read_by(rank, world_size, step) for rank in range(world_size)]
        assert len(set(alone)) == 16 and all(len(part) == 16 // world_size for part in parts)
        assert [i for part in parts for i in part] == alone


def test_online_knn_splits_subjects_when_the_manifest_has_no_split(tmp_path):
    import nibabel as nib
    import pandas as pd
    import torch
    from conftest import head_like_volume

    from braindino.cli import main
    from braindino.store import SliceStore
    from braindino.train.online_knn import OnlineKNN

    rng = np.random.default_rng(1)
    rows = []
    for i in range(6):
        nib.save(nib.Nifti1Image(head_like_volume(rng, lesion=i % 2 == 1), np.eye(4)), tmp_path / f"s{i}.nii.gz")
        rows.append({"path": f"s{i}.nii.gz", "subject": f"s{i}", "diagnosis": i % 2})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    assert main(["prepare", "--manifest", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "store"),
                 "--size", "32", "--workers", "1"]) == 0
    knn = OnlineKNN(SliceStore(tmp_path / "store"), "diagnosis", slices_per_volume=4, seed=0)
    assert knn.is_train.sum() == 3 and (~knn.is_train).sum() == 3
    mean_intensity = knn.accuracy(lambda images: images.mean(dim=(1, 2, 3)).unsqueeze(1).repeat(1, 2),
                                  torch.device("cpu"), image_size=32)
    assert 0.0 <= mean_intensity.low <= mean_intensity.accuracy <= mean_intensity.high <= 1.0
    assert mean_intensity.volumes == 6          # the seeded halves swap roles: every volume is scored once
