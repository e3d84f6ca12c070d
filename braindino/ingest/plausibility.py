"""Warnings for a volume that reads and preprocesses fine but is unlikely to be the head image a manifest means.

Three signs, each a :class:`GeometryWarning` (cause and hint, one line each): a foreground under
``MIN_HEAD_EXTENT_MM`` across (voxel sizes in the wrong units, or not a head), voxels more than
``MAX_SLICE_SPACING_MM`` apart along some axis (thick slices), and an image with at most ``MAX_LABEL_VALUES``
distinct values (a label map or mask listed as the image). ``braindino prepare`` prints them and stores the volume,
or refuses it with ``--strict``.
"""

from dataclasses import dataclass

import numpy as np

from braindino.ingest.preprocess import PreprocessedVolume
from braindino.ingest.readers import Volume

MIN_HEAD_EXTENT_MM = 100.0      # an adult head is 140-200 mm long, a newborn's about 110 mm
MAX_SLICE_SPACING_MM = 6.0
MAX_LABEL_VALUES = 16
SAMPLE_VOXELS = 1 << 16         # distinct values are counted on a sample first, on every voxel only if few


@dataclass(frozen=True)
class GeometryWarning:
    """Why a volume looks implausible (``cause``) and what to check (``hint``); one line each."""

    cause: str
    hint: str


def implausible_geometry(volume: Volume, prepared: PreprocessedVolume) -> list[GeometryWarning]:
    """The warnings for ``volume`` (``data`` ``[X, Y, Z]``) preprocessed into ``prepared``; empty when plausible."""
    warnings = []
    extent = prepared.foreground_extent_mm
    if max(extent) < MIN_HEAD_EXTENT_MM:
        shown = " x ".join(f"{mm:.0f}" for mm in extent)
        warnings.append(GeometryWarning(
            f"foreground is only {max(extent):.0f} mm across ({shown} mm), under {MIN_HEAD_EXTENT_MM:.0f} mm",
            "check the voxel size and its units in the header, and that the file is a head image"))
    if max(volume.spacing) > MAX_SLICE_SPACING_MM:
        shown = " x ".join(f"{mm:.3g}" for mm in volume.spacing)
        warnings.append(GeometryWarning(
            f"slices are {max(volume.spacing):.3g} mm apart (voxels {shown} mm), over {MAX_SLICE_SPACING_MM:g} mm",
            "thick slices resample to blurred or sparse axial slices; use a thinner-slice series if there is one"))
    distinct = distinct_values(volume.data)
    if distinct <= MAX_LABEL_VALUES:
        warnings.append(GeometryWarning(
            f"image holds only {distinct} distinct values (a label map or mask?)",
            "list the intensity image in the path column; a segmentation goes in a 'mask' column"))
    return warnings


def distinct_values(data: np.ndarray) -> int:
    """Number of distinct values of ``data``, exact up to ``MAX_LABEL_VALUES`` (a larger count may be a sample's:
    every voxel is counted only when an evenly spaced sample of ``SAMPLE_VOXELS`` holds that few)."""
    flat = data.ravel()
    sampled = np.unique(flat[::max(1, flat.size // SAMPLE_VOXELS)]).size
    return sampled if sampled > MAX_LABEL_VALUES else int(np.unique(flat).size)


def warning_line(warnings: list[GeometryWarning]) -> str:
    """``warnings`` (at least one) as one ``"{causes} — {hints}"`` text, each part joined with "; "."""
    return f"{'; '.join(w.cause for w in warnings)} — {'; '.join(w.hint for w in warnings)}"
