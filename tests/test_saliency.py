"""Saliency: token indexing against timm's own attention, exact patch-to-voxel mapping, RAS vs LPS agreement."""

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    head_like_volume,
    tumour_volume,
    write_local_model,
    write_tiny_model,
)

from braindino.encoder.volume import ingest_source, volume_geometry
from braindino.ingest import PreprocessConfig
from braindino.saliency.volume_maps import patch_maps_to_native


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
    _volume, prepared, geometry = _volume_and_geometry(native_data, affine, spacing_mm=2.0)
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
                           montage=False, device="cpu").paths
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


def tumour_mass_ratio(saliency_map: np.ndarray, mask: np.ndarray, head: np.ndarray) -> float:
    """Share of the map's mass inside the tumour ÷ the tumour's share of the head's voxels (1 = no localisation)."""
    inside = saliency_map[mask].sum() / max(float(saliency_map[head].sum()), 1e-12)
    return float(inside / (mask.sum() / head.sum()))


def test_tumour_probe_gradient_puts_its_mass_on_the_tumour(tmp_path):
    """Known answer: an encoder whose patch tokens carry their own patch's brightness only (``write_local_model``),
    FLAIR-like heads where only a bright one-sided tumour tells tumour from healthy (``tumour_volume``, stored LPS), a linear
    tumour-vs-healthy head on mean-pooled slice features trained on 8 heads, which classifies 4 held-out heads
    right. Its probe-gradient map, back on the native grid, holds far more mass inside the tumour mask than the mask's
    share of the head: measured 4.6 and 4.4 (the tumour is ~3 % of the head, patch-sized blocks blur its edge).
    Planted bugs fall below the bound of 3: gradient taken at the tokens alone, no path integral (the saturating
    final LayerNorm gives the tumour's own patches almost nothing) 1.90; map shifted by one patch 2.42; native
    reorientation skipped 0.29; sign of the token gradient or of the head's logit flipped 0.02. CLS attention and
    rollout of this encoder are ~1.0 (its attention ignores content)."""
    import pandas as pd

    from braindino.saliency import run_saliency

    rng = np.random.default_rng(0)
    rows, masks = [], {}
    for i in range(12):
        data, mask = tumour_volume(rng, tumour=i % 2 == 1)
        data, mask = np.ascontiguousarray(data[::-1, ::-1]), mask[::-1, ::-1]      # stored LPS: a map left in
        path = tmp_path / f"sub-{i:02d}.nii.gz"                                        # RAS order is mirrored
        nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])), path)
        masks[f"sub-{i:02d}"] = (mask, data > 0)
        rows.append({"path": path.name, "subject": f"sub-{i:02d}", "split": "train" if i < 8 else "test",
                     "tumour": "tumour" if mask.any() else "healthy"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    model = write_local_model(tmp_path / "model")
    run_saliency(str(model), tmp_path / "out", manifest=str(tmp_path / "manifest.csv"), task="classification",
             target="tumour", pooling="mean", montage=False, device="cpu", class_name="tumour")
    index = pd.read_csv(tmp_path / "out" / "saliency.csv")
    assert len(index) == 4
    assert (index["predicted"] == index["subject"].map(dict(zip([r["subject"] for r in rows],
                                                                  [r["tumour"] for r in rows])))).all()
    ratios = []
    for _, record in index[index["predicted"] == "tumour"].iterrows():
        mask, head = masks[record["subject"]]
        assert record["probability"] > 0.9
        ratios.append(tumour_mass_ratio(np.asarray(nib.load(record["head_gradient"]).dataobj), mask, head))
    assert len(ratios) == 2 and min(ratios) > 3.0, ratios


def _planes(cuts, affine, shape) -> list[int]:
    """The voxel index k of the axial plane nearest each world z of ``cuts`` (axis 2 along world z)."""
    return [int(round((z - affine[2, 3]) / affine[2, 2])) for z in cuts]


def test_montage_cuts_go_through_the_lesion_on_a_flipped_grid_and_otherwise_through_the_maps_maximum():
    from braindino.saliency.montage import CUTS, cuts_around_peak, cuts_through_lesion

    affine = np.diag([-1.0, 1.0, -2.0, 1.0])                 # z stored inferior-first: voxel k at world -2k + 40
    affine[2, 3] = 40.0
    lesion = np.zeros((20, 20, 40), np.uint8)
    lesion[5:9, 5:9, 27:33] = 1                               # planes 27..32 only, far from the volume's middle
    cuts = cuts_through_lesion(lesion, affine)
    assert len(cuts) == CUTS
    planes = _planes(cuts, affine, lesion.shape)
    assert all(lesion[:, :, k].any() for k in planes), planes
    assert min(planes) < 30 < max(planes)                     # spread over the lesion, not one plane
    with pytest.raises(ValueError, match="no foreground"):
        cuts_through_lesion(np.zeros_like(lesion), affine)

    saliency = np.zeros((20, 20, 40), np.float32)
    saliency[3, 4, 9] = 1.0                                   # the maximum, world z = 22
    saliency[10, 10, 30] = 0.5
    cuts = cuts_around_peak(saliency, affine)
    assert len(cuts) == CUTS and cuts[CUTS // 2] == 22.0
    assert all(abs(z - 22.0) <= 12.0 for z in cuts) and len(set(cuts)) == CUTS
    four_d = np.stack([np.zeros_like(saliency), saliency], axis=-1)          # per-head maps: the max over heads
    assert cuts_around_peak(four_d, affine)[CUTS // 2] == 22.0


def test_montage_of_a_listed_image_cuts_through_its_manifest_mask_and_an_unreadable_mask_fails_only_its_volume(
        tmp_path, tiny_encoder, capsys):
    import pandas as pd

    from braindino.saliency import run_saliency

    rng = np.random.default_rng(3)
    rows = []
    for i in range(3):
        data, mask = tumour_volume(rng, tumour=True)
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"sub-{i}.nii.gz")
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), tmp_path / f"sub-{i}_mask.nii.gz")
        rows.append({"path": f"sub-{i}.nii.gz", "subject": f"sub-{i}", "mask": f"sub-{i}_mask.nii.gz"})
    (tmp_path / "sub-2_mask.nii.gz").write_bytes(b"not a nifti")
    rows.append({"path": "healthy.nii.gz", "subject": "healthy", "mask": ""})
    nib.save(nib.Nifti1Image(tumour_volume(rng, tumour=False)[0], np.eye(4)), tmp_path / "healthy.nii.gz")
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    images = [tmp_path / "sub-0.nii.gz", tmp_path / "sub-2.nii.gz", tmp_path / "healthy.nii.gz"]
    run = run_saliency(tiny_encoder.name, tmp_path / "out", images=images, manifest=str(tmp_path / "manifest.csv"),
                       device="cpu")
    err = capsys.readouterr().err
    assert run.failed == 1 and err.count("error:") == 1
    assert "sub-2_mask.nii.gz" in err and "lesion mask could not be read" in err
    assert not (tmp_path / "out" / "sub-2").exists()                       # nothing of the failed volume written
    cuts = {r["name"]: r["montage_cuts"] for r in run.records}
    assert cuts == {"sub-0": "through the lesion mask", "healthy": "around the map's maximum"}
    assert (tmp_path / "out" / "sub-0" / "montage.png").stat().st_size > 1000
