"""Shared test helpers: synthetic heads and cohorts written as real NIfTI files, a tiny slice store built through
the real `braindino prepare`, tiny model folders, and the overrides that shrink a training recipe to seconds."""

import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

os.environ.setdefault("WANDB_MODE", "disabled")

# A depth-2 ViT-Ti on 32 px crops with small heads, batch 8, in-process data loading and no progress bar: the
# common core of the training tests' overrides (each test file adds what it checks on top).
TINY_RECIPE = ["model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "crops.global_size=32",
               "crops.local_size=16", "dino.n_prototypes=64", "ibot.n_prototypes=64", "dino.head_hidden_dim=64",
               "dino.head_bottleneck_dim=32", "optim.global_batch_size=8", "train.num_workers=0",
               "train.progress=false"]


def head_like_volume(rng: np.random.Generator, shape=(40, 40, 20), lesion: bool = False) -> np.ndarray:
    """``[X, Y, Z]`` float32: a smooth ellipsoidal 'head' with textured interior and an optional bright lesion."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radii = rng.uniform(0.75, 0.9, size=3)[:, None, None, None]
    inside = ((grid / radii) ** 2).sum(0) < 1
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    volume = inside * (100 + 400 * (texture - texture.min()) / np.ptp(texture))
    if lesion:
        centre = rng.uniform(-0.3, 0.3, size=3)[:, None, None, None]
        volume[(((grid - centre) / 0.25) ** 2).sum(0) < 1] = 900
    return volume.astype(np.float32)


def lesion_cohort(root, n_subjects: int = 12, affine=None, masks: bool = False) -> list[dict]:
    """Write ``n_subjects`` × (T1, FLAIR) head-like volumes [32, 32, 10] into ``root`` (seed 0; odd subjects with a
    bright lesion, and with ``masks`` its mask, voxels > 850, beside each volume) → the manifest rows: path, subject,
    sequence, dx (lesion / healthy), age, time, event (and mask). The caller edits and writes them."""
    affine = np.eye(4) if affine is None else affine
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_subjects):
        lesion = i % 2 == 1
        for sequence in ("T1", "FLAIR"):
            data = head_like_volume(rng, shape=(32, 32, 10), lesion=lesion)
            path = root / f"sub-{i:02d}_{sequence}.nii.gz"
            nib.save(nib.Nifti1Image(data, affine), path)
            rows.append({"path": path.name, "subject": f"sub-{i:02d}", "sequence": sequence,
                         "dx": "lesion" if lesion else "healthy", "age": 40 + 3 * i + 10 * lesion,
                         "time": 5 + i + 20 * (not lesion), "event": int(i % 3 != 0)})
            if masks:
                mask = root / f"sub-{i:02d}_{sequence}_mask.nii.gz"
                nib.save(nib.Nifti1Image((data > 850).astype(np.int16), affine), mask)
                rows[-1]["mask"] = mask.name
    return rows


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A slice store of 8 small volumes (size 32×32) with a `diagnosis` label and train/val split."""
    from braindino.cli import main

    root = tmp_path_factory.mktemp("tiny_cohort")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        lesion = i % 2 == 1
        path = root / f"sub-{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(head_like_volume(rng, lesion=lesion), np.eye(4)), path)
        rows.append({"path": path.name, "subject": f"sub-{i:02d}", "split": "train" if i < 6 else "val",
                     "diagnosis": "lesion" if lesion else "healthy"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    store = root / "store"
    status = main(["prepare", "--manifest", str(root / "manifest.csv"), "--out", str(store), "--size", "32",
                   "--workers", "1"])
    assert status == 0
    return store


def write_tiny_model(folder, preprocessing: dict | None = None):
    """Write a braindino model folder holding a depth-1 ViT-Ti (patch 8, 32 px: a 4 × 4 grid, LayerScale 1.0 so
    the block actually changes the tokens), seeded, with ``preprocessing`` (default: 32-px slices); returns it."""
    from dataclasses import asdict

    import torch

    from braindino.encoder.model_folder import timm_config, write_model_folder
    from braindino.ingest import PreprocessConfig
    from braindino.models import MaskableViT

    torch.manual_seed(0)
    vit = MaskableViT("vit_tiny", patch_size=8, img_size=32, depth=1, layerscale_init=1.0).vit
    preprocessing = asdict(PreprocessConfig(size=32)) if preprocessing is None else preprocessing
    write_model_folder(folder, timm_config("vit_tiny", 192, 1, 3, 8, 32, 4, 1.0, preprocessing, {}), vit.state_dict())
    return folder


def write_local_model(folder, size: int = 32, patch: int = 4):
    """A braindino model folder whose patch tokens provably carry their own patch's brightness and nothing else:
    the patch embedding puts the patch's mean intensity on channel 0 and a constant 1 on channel 1 (all else 0), no
    position embedding, LayerScale 0 on both residual branches of its one block (the block is the identity; its
    attention is still computed), final norm weight 1 / bias 0. Each patch's output token is LayerNorm([μ, 1, 0..]),
    rising with the patch's mean intensity μ; a head on the mean patch token is a sum over patches. Returns it."""
    from dataclasses import asdict

    import torch

    from braindino.encoder.model_folder import timm_config, write_model_folder
    from braindino.ingest import PreprocessConfig
    from braindino.models import MaskableViT

    torch.manual_seed(0)
    vit = MaskableViT("vit_tiny", patch_size=patch, img_size=size, depth=1, layerscale_init=1.0).vit
    state = vit.state_dict()
    weight, bias = torch.zeros_like(state["patch_embed.proj.weight"]), torch.zeros_like(state["patch_embed.proj.bias"])
    weight[0], bias[1] = 1.0 / patch ** 2, 1.0
    state.update({"patch_embed.proj.weight": weight, "patch_embed.proj.bias": bias,
                  "pos_embed": torch.zeros_like(state["pos_embed"]), "norm.weight": torch.ones_like(state["norm.weight"]),
                  "norm.bias": torch.zeros_like(state["norm.bias"])})
    state.update({key: torch.zeros_like(value) for key, value in state.items() if key.endswith(("ls1.gamma", "ls2.gamma"))})
    write_model_folder(folder, timm_config("vit_tiny", 192, 1, 3, patch, size, 4, 1.0,
                                           asdict(PreprocessConfig(size=size)), {}), state)
    return folder


def tumour_volume(rng: np.random.Generator, shape=(32, 32, 16), tumour: bool = True):
    """``(volume [X, Y, Z] float32, tumour mask bool)``: a FLAIR-like skull-stripped head (fixed ellipsoid, fine
    texture 200-400 uniform by rank, 1 % sparse bright voxels at 500) with, when ``tumour``, a bright (500)
    ellipsoidal tumour (radii 4.5, 4.5, 3 voxels) in one hemisphere. Healthy and tumour heads get the same intensity
    window from the preprocessing's percentiles (the sparse bright voxels set the 99.5th in both), so only the tumour
    tells them apart — not a brain darkened by a bright tumour taking the top percentile."""
    from scipy.stats import rankdata

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = ((grid / 0.85) ** 2).sum(0) < 1
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 0.7)
    volume = np.zeros(shape)
    volume[inside] = 200 + 200 * rankdata(texture[inside]) / inside.sum()
    volume[inside & (rng.uniform(size=shape) < 0.01)] = 500
    mask = np.zeros(shape, dtype=bool)
    if tumour:
        centre = np.array([rng.choice([-1, 1]) * rng.uniform(0.35, 0.45), rng.uniform(-0.3, 0.3),
                           rng.uniform(-0.2, 0.2)])
        radii = np.array([4.5, 4.5, 3.0]) * 2 / (np.array(shape) - 1)
        mask = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1
        volume[mask] = 500
    return volume.astype(np.float32), mask
