"""The head mask behind the ``otsu`` foreground: every voxel inside the head, on any contrast, and little air.

Otsu's threshold alone splits the two largest intensity classes. On a T1-weighted head those are air and tissue;
on T2-weighted, b0 (DWI) or FLAIR heads with a bright lesion they can be tissue and bright CSF, and brain tissue
falls below the threshold. :func:`head_mask` therefore thresholds just above the background instead:

1. Threshold ``t = min(Otsu, max(robust, noise))``. ``robust = p2 + 0.1 (p98 - p2)`` (FSL BET's robust threshold:
   a tenth of the robust intensity range). ``noise = lo + NOISE_MODES (mode - lo)``: ``mode`` is the most common
   non-zero value below ``min(Otsu, robust)`` — the background's noise level (the Rayleigh mode ``sigma`` of a
   magnitude image's air) — and ``lo`` the image minimum (0 for magnitude images). Otsu caps ``t``: where little
   air is in the field of view, the other two levels can land inside the tissue.
2. Detect ``t`` on the image smoothed by a Gaussian of ``SMOOTHING_VOXELS``: the air's noise shrinks about
   sevenfold, so a dim scalp on a noisy image still forms one closed surface.
3. Fill holes in 3D and in every axial slice (dark skull, CSF, ventricles and sinuses inside the scalp; a head cut
   by the field of view at the neck is closed slice by slice) and keep the largest 3D connected component (noise
   specks, ghosts, a marker capsule apart from the head).
4. Peel the smoothing's halo: up to ``PEEL_LAYERS`` times, boundary voxels (a face, edge or corner neighbour
   outside) whose own (unsmoothed) value is at most ``t`` are dropped; then fill again. Only the outer surface is
   peeled, and only where it is as dark as the air: dark tissue inside the head stays.
"""

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ROBUST_PERCENTILES = (2.0, 98.0)
ROBUST_SHARE = 0.1               # a tenth of the robust range
NOISE_MODES = 2.0                # threshold at twice the background's noise mode (smoothed air: 1.25 +- 0.1 modes)
MODE_BINS = 64
SMOOTHING_VOXELS = 1.0
PEEL_LAYERS = 2                  # the 1-voxel Gaussian's halo reaches at most 2 voxels past a bright edge
AXIAL_FILL_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)   # 4-connected within an axial slice, nothing across
AXIAL_FILL_STRUCTURE[:, :, 1] = ndimage.generate_binary_structure(2, 1)


def head_mask(data: np.ndarray) -> np.ndarray:
    """Boolean ``[X, Y, Z]`` head of ``data`` ``[X, Y, Z]`` (see the module docstring)."""
    data = np.asarray(data, dtype=np.float32)
    threshold = head_threshold(data)
    smoothed = ndimage.gaussian_filter(data, SMOOTHING_VOXELS)
    mask = _largest_component(_filled(smoothed > threshold))
    for _ in range(PEEL_LAYERS):
        boundary = mask & ~_eroded(mask)
        mask &= ~(boundary & (data <= threshold))
    return _filled(mask)


def head_threshold(data: np.ndarray) -> float:
    """The threshold ``min(Otsu, max(robust, noise))`` of step 1 for ``data`` ``[X, Y, Z]`` float32."""
    p_low, p_high = np.percentile(data, ROBUST_PERCENTILES)
    robust = float(p_low + ROBUST_SHARE * (p_high - p_low))
    otsu = otsu_threshold(data)
    low = data[(data != 0) & (data < min(robust, otsu))]
    if low.size == 0:
        return min(otsu, robust)
    counts, edges = np.histogram(low, bins=MODE_BINS)
    peak = int(np.argmax(counts))
    mode = float(edges[peak] + edges[peak + 1]) / 2
    floor = min(float(data.min()), 0.0)
    return min(otsu, max(robust, floor + NOISE_MODES * (mode - floor)))


def otsu_threshold(data: np.ndarray) -> float:
    """SimpleITK's Otsu threshold of the values of ``data`` (any shape; ITK's [z, y, x] reading is irrelevant)."""
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(data))
    return float(otsu.GetThreshold())


def _eroded(mask: np.ndarray) -> np.ndarray:
    """``mask`` ``[X, Y, Z]`` eroded by the full 3×3×3 neighbourhood (a halo voxel's distance to the air counts
    diagonals too), outside the array counting as inside: ``binary_erosion`` with that structure and
    ``border_value=1``, as a separable minimum filter (three 1D passes instead of 27 offsets)."""
    return ndimage.minimum_filter(mask.view(np.uint8), size=3, mode="constant", cval=1).view(bool)


def _holes_filled(mask: np.ndarray, structure: np.ndarray | None = None, edge_axes=(0, 1, 2)) -> np.ndarray:
    """``binary_fill_holes(mask, structure)`` for ``[X, Y, Z]`` masks, by one labelling of the background: a
    background component is a hole unless it reaches the array's faces on ``edge_axes`` (the faces ``structure``
    connects to the outside). Twice as fast as scipy's iterated dilation, and the same voxels."""
    background = ~mask
    labels, count = ndimage.label(background, structure=structure)
    reaches_edge = np.zeros(count + 1, dtype=bool)
    for axis in edge_axes:
        reaches_edge[np.take(labels, 0, axis=axis)] = True
        reaches_edge[np.take(labels, -1, axis=axis)] = True
    reaches_edge[0] = False
    return mask | (background & ~reaches_edge[labels])


def _filled(mask: np.ndarray) -> np.ndarray:
    """``mask`` ``[X, Y, Z]`` with its 3D holes and then each axial slice's holes filled."""
    return _holes_filled(_holes_filled(mask), AXIAL_FILL_STRUCTURE, edge_axes=(0, 1))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask`` (``mask`` itself when it has at most one)."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == np.argmax(sizes)
