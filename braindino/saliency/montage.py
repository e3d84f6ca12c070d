"""A PNG montage of a volume's saliency maps over its anatomy: one row of axial cuts per map (nilearn
``plot_stat_map``), drawn on a ``matplotlib.figure.Figure`` (Agg, no pyplot state).

The cuts go through what the reader wants to see: with a lesion mask, ``CUTS`` planes spread over the lesion's
extent and the lesion outlined on every row; without one, planes around the first map's maximum (the middle plane
through it).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure

from braindino.atomic import atomic_path

CUTS = 7
DPI = 100
AROUND_PEAK_MM = 12.0      # without a lesion, the cuts span the map's maximum ± this (world z, mm)


def _world_z(voxels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World z (mm) of voxel indices ``voxels`` [N, 3]."""
    return voxels @ affine[2, :3] + affine[2, 3]


def cuts_through_lesion(lesion: np.ndarray, affine: np.ndarray) -> list[float]:
    """World z of ``CUTS`` axial planes evenly between the 5th and 95th percentiles of the z of the voxels of
    ``lesion`` [X, Y, Z] > 0: every plane cuts the bulk of a contiguous lesion, none only its thin tips. Raises
    ValueError for an empty mask."""
    z = _world_z(np.argwhere(lesion > 0), affine)
    if not len(z):
        raise ValueError("the lesion mask has no foreground voxel")
    return [float(v) for v in np.linspace(*np.percentile(z, [5, 95]), CUTS)]


def cuts_around_peak(saliency: np.ndarray, affine: np.ndarray) -> list[float]:
    """World z of ``CUTS`` axial planes within ±``AROUND_PEAK_MM`` of the maximum of ``saliency`` [X, Y, Z(, …)]
    (clipped to the volume's z extent), the middle one through the maximum's voxel."""
    values = saliency.reshape(saliency.shape[:3] + (-1,)).max(axis=-1)
    peak = _world_z(np.array([np.unravel_index(int(np.argmax(values)), values.shape)]), affine)[0]
    corners = np.array([[i, j, k] for i in (0, values.shape[0] - 1) for j in (0, values.shape[1] - 1)
                        for k in (0, values.shape[2] - 1)])
    extent = _world_z(corners, affine)
    low, high = max(peak - AROUND_PEAK_MM, extent.min()), min(peak + AROUND_PEAK_MM, extent.max())
    below, above = np.linspace(low, peak, CUTS // 2 + 1)[:-1], np.linspace(peak, high, CUTS - CUTS // 2)
    return [float(v) for v in np.concatenate([below, above])]


def saliency_montage(anatomy_path, maps: list[tuple[str, object]], path, title: str = "",
                     lesion: nib.Nifti1Image | None = None) -> Path:
    """``maps``: [(label, nibabel image on the anatomy's grid)] → PNG at ``path`` (atomically). ``lesion``: a
    label image (any grid; > 0 is the lesion) to cut through and outline, or None (cut around the first map's
    maximum)."""
    from nilearn import image, plotting

    anatomy = image.load_img(str(anatomy_path))
    if lesion is not None:
        outline = nib.Nifti1Image((np.asarray(lesion.dataobj) > 0).astype(np.uint8), lesion.affine)
        cuts = cuts_through_lesion(np.asarray(outline.dataobj), outline.affine)
    else:
        outline, first = None, maps[0][1]
        cuts = cuts_around_peak(np.asarray(first.dataobj), first.affine)
    figure = Figure(figsize=(2.0 * CUTS, 2.3 * len(maps)), facecolor="black")
    height = 1.0 / len(maps)
    for row, (label, stat_map) in enumerate(maps):
        axes = figure.add_axes((0.0, 1.0 - (row + 1) * height, 1.0, height))
        values = np.asarray(stat_map.dataobj)
        top = float(np.percentile(values[values > 0], 99)) if (values > 0).any() else 1.0
        display = plotting.plot_stat_map(stat_map, bg_img=anatomy, display_mode="z", cut_coords=cuts, axes=axes,
                                         figure=figure, title=f"{title} {label}".strip(), black_bg=True,
                                         colorbar=True, cmap="hot", threshold=top * 0.05, vmax=top, draw_cross=False,
                                         annotate=False)
        if outline is not None:
            display.add_contours(outline, levels=[0.5], colors="cyan", linewidths=1.2)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, facecolor="black")
    return Path(path)
