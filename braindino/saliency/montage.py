"""A PNG montage of a volume's saliency maps over its anatomy: one row of axial cuts per map (nilearn
``plot_stat_map``), drawn on a ``matplotlib.figure.Figure`` (Agg, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from braindino.atomic import atomic_path

CUTS = 7
DPI = 100


def _cuts(maps: list, affine: np.ndarray) -> list[float]:
    """World z (mm) of ``CUTS`` axial planes spread over the extent where the first map is non-zero."""
    data = np.asarray(maps[0][1].dataobj)
    voxels = np.argwhere(data > 0)
    if not len(voxels):
        voxels = np.argwhere(np.ones(data.shape[:3], dtype=bool))
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    low, high = np.percentile(world[:, 2], [10, 90])
    return [float(v) for v in np.linspace(low, high, CUTS)]


def saliency_montage(anatomy_path, maps: list[tuple[str, object]], path, title: str = "") -> Path:
    """``maps``: [(label, nibabel image on the anatomy's grid)] → PNG at ``path`` (atomically)."""
    from nilearn import image, plotting

    anatomy = image.load_img(str(anatomy_path))
    figure = Figure(figsize=(2.0 * CUTS, 2.3 * len(maps)), facecolor="black")
    cuts = _cuts(maps, anatomy.affine)
    height = 1.0 / len(maps)
    for row, (label, stat_map) in enumerate(maps):
        axes = figure.add_axes((0.0, 1.0 - (row + 1) * height, 1.0, height))
        values = np.asarray(stat_map.dataobj)
        top = float(np.percentile(values[values > 0], 99)) if (values > 0).any() else 1.0
        plotting.plot_stat_map(stat_map, bg_img=anatomy, display_mode="z", cut_coords=cuts, axes=axes,
                               figure=figure, title=f"{title} {label}".strip(), black_bg=True, colorbar=True,
                               cmap="hot", threshold=top * 0.05, vmax=top, draw_cross=False, annotate=False)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, facecolor="black")
    return Path(path)
