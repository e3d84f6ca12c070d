"""Subject anatomy from the MNI152 2009 template shipped inside nilearn: tissue maps, atrophy and warps.

Every volume here lies on the template grid (RAS voxel order: axis 0 = R, 1 = A, 2 = S) at the chosen resolution,
as ``[X, Y, Z]`` float32 arrays; the template's affine is diagonal (MNI mm). A subject is the template after age/AD-related tissue loss, seen through a random
global affine and a smooth random displacement field; the warp is a coordinate array ``[3, X, Y, Z]`` that gives,
for each output voxel, the template voxel it shows.
"""

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.spatial.transform import Rotation

from braindino.errors import InputError

TEMPLATE_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}
BRAIN_CENTRE_MNI = np.array([0.0, -18.0, 15.0])          # rotation/scaling centre of the global affine, mm
VENTRICLE_BOX_MNI = ((-32, 32), (-50, 35), (-25, 40))    # mm box holding the ventricles and basal cisterns
MEDIAL_TEMPORAL_MNI = ((27, -20, -13, 8.0), (22, -5, -20, 7.0), (42, -15, -25, 11.0))   # x (mirrored), y, z, sigma
DISPLACEMENT_CONTROL_SHAPE = (7, 8, 7)                   # control points of the smooth displacement field
HEAD_MARGIN_MM = 30.0                                    # skull + scalp never reach further out than this
MAX_THICKNESS_FACTOR = 1.5                               # bound of the smooth skull/scalp thickness variation


def template_directory() -> Path:
    """Folder of the MNI152 maps inside the installed nilearn package (located without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise InputError("nilearn", "the nilearn package is not installed",
                         "pip install 'nilearn>=0.10.3'; its wheel ships the MNI152 template the cohort is built from")
    folder = Path(spec.origin).parent / "datasets" / "data"
    for name in TEMPLATE_FILES.values():
        if not (folder / name).is_file():
            raise InputError(folder / name, "MNI152 template map missing from the nilearn install",
                             "reinstall nilearn >= 0.10.3, whose wheel includes the 2009 MNI152 T1/GM/WM maps")
    return folder


@dataclass(frozen=True)
class Template:
    """Template maps on one grid; arrays ``[X, Y, Z]`` float32 (read-only) unless stated."""

    gm: np.ndarray                     # grey-matter fraction
    wm: np.ndarray                     # white-matter fraction
    skull_distance_mm: np.ndarray      # signed distance to the skull's inner surface: > 0 outside, < 0 inside
    pial_distance_mm: np.ndarray       # distance to the nearest voxel that is not mostly tissue (0 there)
    ventricle_distance_mm: np.ndarray  # distance to the ventricles and basal cisterns (0 inside)
    temporal_weight: np.ndarray        # [0, 1] emphasis of the medial temporal lobes (AD-like atrophy)
    periventricular_sites: np.ndarray  # [K, 3] float32 voxel coordinates of periventricular white matter
    deep_white_sites: np.ndarray       # [M, 3] float32 voxel coordinates of deep hemispheric white matter
    brain_box: np.ndarray              # [2, 3] float64 lowest/highest voxel coordinates holding any GM or WM
    head_box: np.ndarray               # [2, 3] float64 voxel bounds of everything within HEAD_MARGIN_MM of the skull
    affine: np.ndarray                 # [4, 4] float64 voxel -> MNI mm
    spacing_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.gm.shape


@dataclass(frozen=True)
class AnatomyParams:
    """Everything that makes one subject's anatomy differ from the template."""

    age: float
    sex: str                              # "F" or "M"
    cortical_thinning_mm: float           # GM removed at the pial/CSF surface, everywhere
    ventricle_growth_mm: float            # tissue replaced by CSF around the ventricles
    temporal_thinning_mm: float           # extra thinning weighted by the medial-temporal map (AD-like)
    temporal_gm_loss: float               # fraction of medial-temporal GM lost (AD-like hippocampal atrophy)
    scale: float                          # isotropic head scale
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    displacement_mm: np.ndarray           # [3, *DISPLACEMENT_CONTROL_SHAPE] control values of the displacement
    skull_mm: float                       # skull thickness (outer tables + diploe)
    scalp_mm: float                       # scalp (fat) thickness
    skull_variation: np.ndarray           # [4, 4, 4] controls of a smooth log-factor on skull and scalp thickness


def draw_anatomy(rng: np.random.Generator, age: float, sex: str, alzheimer_like: bool) -> AnatomyParams:
    """Random anatomy of a subject of the given age and sex; AD-like subjects get extra medial-temporal atrophy."""
    years = max(age - 20.0, 0.0)
    spread = rng.lognormal(0.0, 0.2, size=2)
    return AnatomyParams(
        age=float(age), sex=sex,
        cortical_thinning_mm=float(0.02 * years * spread[0]),
        ventricle_growth_mm=float(0.03 * years * spread[1] + (1.0 if alzheimer_like else 0.0)),
        temporal_thinning_mm=float(rng.uniform(1.0, 2.0) if alzheimer_like else 0.0),
        temporal_gm_loss=float(rng.uniform(0.3, 0.6) if alzheimer_like else 0.0),
        scale=float((1.03 if sex == "M" else 0.97) * rng.lognormal(0.0, 0.03)),
        rotation_deg=tuple(float(v) for v in np.clip(rng.normal(0.0, 3.0, size=3), -8, 8)),
        translation_mm=tuple(float(v) for v in np.clip(rng.normal(0.0, 2.0, size=3), -6, 6)),
        displacement_mm=rng.normal(0.0, 2.0, size=(3, *DISPLACEMENT_CONTROL_SHAPE)).astype(np.float32),
        skull_mm=float(rng.uniform(5.0, 8.0)),
        scalp_mm=float(rng.uniform(4.0, 9.0)),
        skull_variation=rng.normal(0.0, 0.15, size=(4, 4, 4)).astype(np.float32),
    )


@functools.cache
def _interpolation_matrix(n_points: int, n_controls: int) -> np.ndarray:
    """``[n_points, n_controls]`` cubic-spline weights spreading evenly spaced control values over a line."""
    controls = np.linspace(0.0, n_points - 1.0, n_controls)
    return CubicSpline(controls, np.eye(n_controls))(np.arange(n_points)).astype(np.float32)


def upsample_controls(controls: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Cubic-spline upsampling of a control grid ``[gx, gy, gz]`` to a smooth field ``[X, Y, Z]`` float32.

    Separable: three matrix products, so it costs a few BLAS calls even at 1 mm.
    """
    wx, wy, wz = (_interpolation_matrix(n, g) for n, g in zip(shape, controls.shape))
    field = controls.astype(np.float32) @ wz.T                     # [gx, gy, Z]
    field = np.matmul(wy, field)                                   # [gx, Y, Z]
    return np.tensordot(wx, field, axes=1)                         # [X, Y, Z]


def smooth_random_field(rng: np.random.Generator, shape: tuple[int, int, int],
                        control_shape: tuple[int, int, int]) -> np.ndarray:
    """``[X, Y, Z]`` float32 smooth noise, about unit standard deviation, with ``control_shape`` degrees of freedom."""
    return upsample_controls(rng.standard_normal(control_shape).astype(np.float32), shape)


def mni_coordinates(affine: np.ndarray, shape) -> list[np.ndarray]:
    """MNI mm coordinates of a grid as three broadcastable arrays ``[X,1,1]``, ``[1,Y,1]``, ``[1,1,Z]``."""
    axes = [np.arange(n, dtype=np.float64) * affine[i, i] + affine[i, 3] for i, n in enumerate(shape)]
    return [axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]


def _downsample(volume: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Resample a 1 mm map onto a ``spacing_mm`` grid sharing voxel (0, 0, 0), with Gaussian anti-aliasing."""
    if spacing_mm == 1.0:
        return volume
    smoothed = ndimage.gaussian_filter(volume, 0.5 * np.sqrt(spacing_mm ** 2 - 1.0))
    shape = tuple(int(np.floor((n - 1) / spacing_mm)) + 1 for n in volume.shape)
    return ndimage.affine_transform(smoothed, np.full(3, spacing_mm), output_shape=shape, order=1, mode="nearest")


def _ventricle_mask(csf: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``[X, Y, Z]`` bool at 1 mm: large deep CSF components in the central box (ventricles, basal cisterns)."""
    coarse_depth = ndimage.distance_transform_edt(brain[::2, ::2, ::2] > 0.5) * 2.0
    depth = coarse_depth[np.ix_(*(np.arange(n) // 2 for n in brain.shape))]
    x, y, z = mni_coordinates(affine, brain.shape)
    (x0, x1), (y0, y1), (z0, z1) = VENTRICLE_BOX_MNI
    in_box = (x > x0) & (x < x1) & (y > y0) & (y < y1) & (z > z0) & (z < z1)
    candidates = (csf > 0.5) & in_box & (depth > 8.0)
    labels, count = ndimage.label(candidates)
    sizes = ndimage.sum_labels(candidates, labels, np.arange(1, count + 1))
    return np.isin(labels, 1 + np.flatnonzero(sizes >= 200))


def _medial_temporal_weight(affine: np.ndarray, shape) -> np.ndarray:
    """``[X, Y, Z]`` float32 in [0, 1]: Gaussian blobs over both hippocampi, amygdalae and entorhinal cortices."""
    x, y, z = mni_coordinates(affine, shape)
    weight = np.zeros(shape, dtype=np.float32)
    for cx, cy, cz, sigma in MEDIAL_TEMPORAL_MNI:
        for side in (-1.0, 1.0):
            blob = np.exp(-((x - side * cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma ** 2))
            np.maximum(weight, blob.astype(np.float32), out=weight)
    return weight


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@functools.lru_cache(maxsize=4)
def load_template(spacing_mm: float = 1.0) -> Template:
    """The MNI152 template maps at ``spacing_mm`` (>= 1), cached per process. No network access."""
    if not 1.0 <= spacing_mm <= 6.0:
        raise ValueError(f"template resolution must be within [1, 6] mm, got {spacing_mm}")
    folder = template_directory()
    images = {name: nib.load(folder / file) for name, file in TEMPLATE_FILES.items()}
    t1, gm, wm = (np.asarray(images[n].dataobj, dtype=np.float32) / 255.0 for n in ("t1", "gm", "wm"))
    brain = np.maximum(t1 > 0, np.clip(gm + wm, 0.0, 1.0)).astype(np.float32)
    ventricles = _ventricle_mask(brain - gm - wm, brain, images["t1"].affine).astype(np.float32)

    gm, wm, brain, ventricles = (_downsample(v, spacing_mm) for v in (gm, wm, brain, ventricles))
    affine = images["t1"].affine @ np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    envelope = ndimage.binary_fill_holes((ndimage.gaussian_filter(brain, 4.0 / spacing_mm) > 0.2) | (brain > 0.5))
    sampling = (spacing_mm,) * 3
    skull = (ndimage.distance_transform_edt(~envelope, sampling=sampling)
             - ndimage.distance_transform_edt(envelope, sampling=sampling)).astype(np.float32)
    skull -= np.sign(skull) * (spacing_mm / 2.0)                  # voxel centres -> the surface between them
    pial = ndimage.distance_transform_edt(gm + wm >= 0.5, sampling=sampling).astype(np.float32)
    ventricle_distance = ndimage.distance_transform_edt(ventricles < 0.5, sampling=sampling).astype(np.float32)

    z_mni = mni_coordinates(affine, gm.shape)[2]
    supratentorial = np.broadcast_to(z_mni > -5.0, gm.shape)
    periventricular = (wm > 0.5) & (ventricle_distance > 1.0) & (ventricle_distance <= 8.0) & supratentorial
    deep_white = (wm > 0.6) & (pial > 10.0) & (ventricle_distance > 6.0) & supratentorial
    return Template(
        gm=_read_only(gm), wm=_read_only(wm), skull_distance_mm=_read_only(skull),
        pial_distance_mm=_read_only(pial), ventricle_distance_mm=_read_only(ventricle_distance),
        temporal_weight=_read_only(_medial_temporal_weight(affine, gm.shape)),
        periventricular_sites=_read_only(np.argwhere(periventricular).astype(np.float32)),
        deep_white_sites=_read_only(np.argwhere(deep_white).astype(np.float32)),
        brain_box=_read_only(_bounds(gm + wm > 0.0)), head_box=_read_only(_bounds(skull < HEAD_MARGIN_MM)),
        affine=_read_only(affine), spacing_mm=float(spacing_mm))


def _bounds(mask: np.ndarray) -> np.ndarray:
    """``[2, 3]`` float64: lowest and highest voxel index of ``mask`` along each axis, infinite where ``mask``
    reaches the grid's edge (the template is cut there, and warps extend its edge outward)."""
    voxels = np.argwhere(mask)
    lower, upper = voxels.min(0).astype(np.float64), voxels.max(0).astype(np.float64)
    lower[lower == 0] = -np.inf
    upper[upper == np.array(mask.shape) - 1] = np.inf
    return np.stack([lower, upper])


def output_region(coords: np.ndarray, box: np.ndarray, spacing_mm: float) -> tuple[slice, slice, slice] | None:
    """Bounding box (slices of the output grid) of the voxels whose template coordinates ``coords``
    ``[3, X, Y, Z]`` fall inside the template-voxel ``box`` ``[2, 3]``; None when no voxel does.

    Checked on a grid with a 4 mm stride; box and answer are widened by one stride, which keeps every voxel of a
    near-isometric warp.
    """
    stride = max(1, round(4.0 / spacing_mm))
    sampled = coords[:, ::stride, ::stride, ::stride]
    low, high = (box[0] - stride)[:, None, None, None], (box[1] + stride)[:, None, None, None]
    inside = np.all((sampled >= low) & (sampled <= high), axis=0)
    if not inside.any():
        return None
    voxels = np.argwhere(inside)
    lower, upper = voxels.min(0) * stride - stride, voxels.max(0) * stride + stride + 1
    return tuple(slice(max(int(lo), 0), min(int(hi), n)) for lo, hi, n in zip(lower, upper, coords.shape[1:]))


def _surface_loss(distance_mm: np.ndarray, depth_mm, spacing_mm: float) -> np.ndarray:
    """Fraction of each voxel lying within ``depth_mm`` of a surface, given voxel-centre distances to it."""
    return np.clip((depth_mm - np.maximum(distance_mm - spacing_mm, 0.0)) / spacing_mm, 0.0, 1.0)


def atrophied_tissue(template: Template, anatomy: AnatomyParams) -> tuple[np.ndarray, np.ndarray]:
    """Template-space GM and WM fractions ``[X, Y, Z]`` after cortical thinning, ventricular growth and AD-like
    medial-temporal loss. The intracranial volume is unchanged, so lost tissue becomes CSF."""
    box = tuple(slice(int(max(lo, 0)), int(min(hi, n - 1)) + 1)
                for lo, hi, n in zip(*template.brain_box, template.shape))
    spacing = template.spacing_mm
    temporal = template.temporal_weight[box]
    cortical = _surface_loss(template.pial_distance_mm[box],
                             anatomy.cortical_thinning_mm + anatomy.temporal_thinning_mm * temporal, spacing)
    ventricular = _surface_loss(template.ventricle_distance_mm[box],
                                anatomy.ventricle_growth_mm * (1.0 + temporal), spacing)
    gm_loss = np.maximum(np.maximum(cortical, ventricular), anatomy.temporal_gm_loss * temporal)
    gm, wm = template.gm.copy(), template.wm.copy()
    gm[box] *= 1.0 - gm_loss
    wm[box] *= 1.0 - ventricular
    return gm, wm


def subject_coordinates(template: Template, anatomy: AnatomyParams) -> np.ndarray:
    """``[3, X, Y, Z]`` float32 template voxel coordinates shown by each output voxel of the subject's image.

    Output world point ``x`` shows template point ``c + R^T (x - c - t) / s - d(x)``: rotation ``R``, scale ``s``,
    translation ``t`` about the brain centre ``c``, and a smooth displacement ``d`` (cubic spline of controls).
    """
    affine = template.affine
    rotation = Rotation.from_euler("xyz", anatomy.rotation_deg, degrees=True).as_matrix()
    world_to_template = rotation.T / anatomy.scale
    offset = BRAIN_CENTRE_MNI - world_to_template @ (BRAIN_CENTRE_MNI + np.asarray(anatomy.translation_mm))
    mm_to_voxel = np.linalg.inv(affine)
    linear = mm_to_voxel[:3, :3] @ world_to_template @ affine[:3, :3]
    shift = mm_to_voxel[:3, :3] @ (world_to_template @ affine[:3, 3] + offset) + mm_to_voxel[:3, 3]
    axes = [np.arange(n, dtype=np.float32) for n in template.shape]
    grids = [axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]
    coords = np.empty((3, *template.shape), dtype=np.float32)
    for c in range(3):
        displacement = upsample_controls(anatomy.displacement_mm[c], template.shape) / affine[c, c]
        coords[c] = (linear[c, 0] * grids[0] + linear[c, 1] * grids[1] + linear[c, 2] * grids[2] + shift[c]
                     - displacement)
    return coords


def warp(volume: np.ndarray, coords: np.ndarray, region: tuple[slice, ...] | None, background: float = 0.0
         ) -> np.ndarray:
    """Trilinear sample ``[X, Y, Z]`` of a template-space ``volume`` at ``coords`` ``[3, X, Y, Z]``, computed inside
    the output ``region`` only (``background`` elsewhere); the template's edges extend outward."""
    warped = np.full(coords.shape[1:], background, dtype=np.float32)
    if region is not None:
        warped[region] = ndimage.map_coordinates(volume, coords[(slice(None), *region)], order=1, mode="nearest",
                                                 output=np.float32)
    return warped


@dataclass
class SubjectTissues:
    """Tissue fractions of one subject on the output grid.

    ``fractions`` maps tissue names (csf, gm, wm, bone, marrow, fat; lesions add gliosis, infarct, oedema,
    enhancing, necrosis) to ``[X, Y, Z]`` float32 fractions summing to at most 1 per voxel; the rest is air.
    """

    fractions: dict[str, np.ndarray]
    intracranial: np.ndarray           # [X, Y, Z] float32 fraction inside the skull's inner surface
    spacing_mm: float


def _band(beyond_mm: np.ndarray, start_mm: float, stop_mm: float, spacing_mm: float) -> np.ndarray:
    """Fraction of each voxel (width ``spacing_mm``, centred ``beyond_mm`` outside the skull's inner surface)
    that lies between ``start_mm`` and ``stop_mm``."""
    half = spacing_mm / 2.0
    overlap = np.minimum(beyond_mm + half, stop_mm) - np.maximum(beyond_mm - half, start_mm)
    return np.clip(overlap / spacing_mm, 0.0, 1.0)


def subject_tissues(template: Template, anatomy: AnatomyParams, coords: np.ndarray) -> SubjectTissues:
    """Warp the atrophied template through ``coords`` ``[3, X, Y, Z]`` and wrap it in skull and scalp layers
    (inner table, diploe, outer table, subcutaneous fat) of the subject's thicknesses."""
    spacing = template.spacing_mm
    gm_template, wm_template = atrophied_tissue(template, anatomy)
    brain = output_region(coords, template.brain_box, spacing)
    head = output_region(coords, template.head_box, spacing)
    gm, wm = warp(gm_template, coords, brain), warp(wm_template, coords, brain)
    distance = warp(template.skull_distance_mm, coords, head, background=np.inf) * np.float32(anatomy.scale)
    intracranial = np.clip(0.5 - distance / spacing, 0.0, 1.0)
    fractions = {"csf": np.clip(intracranial - gm - wm, 0.0, 1.0), "gm": gm, "wm": wm,
                 **{name: np.zeros(template.shape, dtype=np.float32) for name in ("bone", "marrow", "fat")}}
    table, skull = 0.25 * anatomy.skull_mm, anatomy.skull_mm
    reach = MAX_THICKNESS_FACTOR * (skull + anatomy.scalp_mm) + spacing
    shell = np.flatnonzero((distance > -spacing) & (distance < reach))         # flat indices of the head's rim
    log_factor = np.clip(upsample_controls(anatomy.skull_variation, template.shape).ravel()[shell],
                         -np.log(MAX_THICKNESS_FACTOR), np.log(MAX_THICKNESS_FACTOR))
    beyond = distance.ravel()[shell] / np.exp(log_factor)
    layers = {name: fractions[name].ravel()[shell] for name in ("csf", "gm", "wm")}
    layers["bone"] = _band(beyond, 0.0, table, spacing) + _band(beyond, skull - table, skull, spacing)
    layers["marrow"] = _band(beyond, table, skull - table, spacing)
    layers["fat"] = _band(beyond, skull, skull + anatomy.scalp_mm, spacing)
    excess = np.maximum(sum(layers.values()), 1.0)
    for name, layer in layers.items():
        fractions[name].ravel()[shell] = layer / excess
    return SubjectTissues(fractions=fractions, intracranial=intracranial, spacing_mm=spacing)
