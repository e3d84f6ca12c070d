"""Saliency: token indexing against timm's own attention, exact patch-to-voxel mapping, RAS vs LPS agreement."""

import nibabel as nib
import numpy as np
import pytest
import torch

from braindino.encoder.volume import ingest_source, volume_geometry
from braindino.ingest import PreprocessConfig
from braindino.saliency.volume_maps import patch_maps_to_native
from conftest import head_like_volume, write_tiny_model


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from braindino import load_encoder

    return load_encoder(write_tiny_model(tmp_path_factory.mktemp("model") / "model"), device="cpu")


def test_cls_attention_is_timms_cls_row_over_patches_without_registers(tiny_encoder):
    from braindino.saliency.maps import attention_maps

    slices = np.random.default_rng(0).uniform(0, 1, (3, 32, 32)).astype(np.float16)
    maps = attention_maps(tiny_encoder, slices)
    vit = tiny_encoder.backbone.vit
    captured = []
    attention = vit.blocks[-1].attn
    attention.fused_attn = False
    handle = attention.attn_drop.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            tiny_encoder.backbone(torch.from_numpy(slices.astype(np.float32))[:, None])
    finally:
        handle.remove()
        attention.fused_attn = True
    prefix = 1 + vit.num_reg_tokens
    reference = captured[0][:, :, 0, prefix:]
    reference = (reference / reference.sum(-1, keepdim=True)).numpy()
    assert maps.cls_attention_heads.shape == (3, vit.blocks[-1].attn.num_heads, 16)
    np.testing.assert_allclose(maps.cls_attention_heads, reference, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(maps.rollout.sum(axis=1), 1.0, rtol=1e-5)


def _volume_and_geometry(data, affine, spacing_mm, size=48, patch=4):
    config = PreprocessConfig(size=size, spacing_mm=spacing_mm)
    volume, prepared = ingest_source((data, affine), None, config)
    geometry = volume_geometry(volume, prepared, size, (size // patch,) * 2)
    return volume, prepared, geometry


def test_a_single_patch_maps_back_to_exactly_its_own_voxels():
    rng = np.random.default_rng(1)
    data = head_like_volume(rng, shape=(40, 44, 12))
    affine = np.array([[0, -2.0, 0, 40], [-2.0, 0, 0, 50], [0, 0, 3.0, -10], [0, 0, 0, 1]])   # permuted + flipped
    native_data = np.ascontiguousarray(data)
    volume, prepared, geometry = _volume_and_geometry(native_data, affine, spacing_mm=2.0)
    patch, grid = 4, geometry["grid"]
    k, row, col = 2, 5, 7                                      # slice k, patch (row, col) of the 12 x 12 grid
    maps = np.zeros((len(prepared.z_indices), grid[0] * grid[1]), dtype=np.float32)
    maps[k, row * grid[1] + col] = 1.0
    native = patch_maps_to_native(maps, prepared.z_indices, geometry, patch)
    assert native.shape == native_data.shape
    # independently: the canonical voxel of every native voxel through the two affines
    hot = np.argwhere(native > 0)
    to_canonical = np.linalg.solve(geometry["affine"], geometry["native_affine"])
    canonical = np.rint(np.c_[hot, np.ones(len(hot))] @ to_canonical.T)[:, :3].astype(int)
    offset = geometry["crop_offset"]
    expected = {(offset[0] + row * patch + i, offset[1] + col * patch + j, int(prepared.z_indices[k]))
                for i in range(patch) for j in range(patch)}
    assert geometry["resampled_shape"] == geometry["canonical_shape"][:2]            # no in-plane resampling
    assert set(map(tuple, canonical)) == expected
    assert np.allclose(native[tuple(hot.T)], 1.0)


def test_ras_and_lps_storage_give_maps_that_agree_in_world_space(tmp_path, tiny_encoder):
    from braindino.saliency import run_saliency

    data = head_like_volume(np.random.default_rng(2), shape=(36, 36, 10), lesion=True)
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    ras[:3, 3] = (-18, -18, -5)
    lps = ras.copy()
    lps[0, 0], lps[1, 1] = -1.0, -1.0
    lps[:2, 3] = 35 + ras[:2, 3]                                  # LPS voxel i holds RAS voxel 35 - i
    nib.save(nib.Nifti1Image(data, ras), tmp_path / "ras.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data[::-1, ::-1]), lps), tmp_path / "lps.nii.gz")
    written = run_saliency(tiny_encoder.name, tmp_path / "out", images=[tmp_path / "ras.nii.gz",
                                                                          tmp_path / "lps.nii.gz"],
                           montage=False, device="cpu")
    assert len([p for p in written if str(p).endswith(".nii.gz")]) == 6
    for name in ("cls_attention", "rollout"):
        ras_map = nib.load(tmp_path / "out" / "ras" / f"{name}.nii.gz")
        lps_map = nib.load(tmp_path / "out" / "lps" / f"{name}.nii.gz")
        assert np.allclose(ras_map.affine, ras) and np.allclose(lps_map.affine, lps)
        # the same world point: voxel v of RAS and the LPS voxel that the affines put at the same place
        voxels = np.argwhere(np.ones(ras_map.shape, dtype=bool))
        world = np.c_[voxels, np.ones(len(voxels))] @ ras_map.affine.T
        lps_voxels = np.rint(world @ np.linalg.inv(lps_map.affine).T)[:, :3].astype(int)
        a = np.asarray(ras_map.dataobj)[tuple(voxels.T)]
        b = np.asarray(lps_map.dataobj)[tuple(lps_voxels.T)]
        assert np.ptp(a) > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
