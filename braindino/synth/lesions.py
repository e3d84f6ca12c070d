"""Lesions painted into a subject's tissue fractions: BraTS-like tumours, vascular-territory strokes and
age-related white-matter hyperintensities, plus the clinical targets the tumours drive.

Lesion shapes live in template (MNI) space and are evaluated at each output voxel's template coordinate
(``coords`` ``[3, X, Y, Z]`` from ``anatomy.subject_coordinates``), so they follow the subject's warp. Edges are
one voxel wide partial-volume ramps. Geometry is in mm so a lesion looks the same at every resolution.
"""

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from braindino.synth.anatomy import SubjectTissues, Template, output_region

TUMOUR_LABELS = {"necrosis": 1, "oedema": 2, "enhancing": 3}       # BraTS-style label values of the mask
# Vascular territories of the right hemisphere (x mirrored for the left): apex mm, direction, half-angle range deg.
TERRITORIES = {
    "MCA": ((14.0, 2.0, -2.0), (1.0, 0.0, 0.35), (20.0, 38.0)),
    "ACA": ((6.0, 20.0, 0.0), (0.0, 0.45, 1.0), (16.0, 28.0)),
    "PCA": ((10.0, -22.0, -4.0), (0.15, -1.0, 0.3), (18.0, 30.0)),
}
STROKE_NOISE_MM = 30.0           # length scale of a territorial infarct's irregular border
TENTORIUM_MNI = (-35.0, -10.0, 0.25)   # behind y0, the cerebellum lies below z = z0 + slope * (y + 60): no infarct
LUMP_BOUND = 0.5                 # lumpy radii stay within a factor 1 +- LUMP_BOUND of the smooth shape
LACUNE_SITES_MM = ((24.0, 2.0, 2.0), (12.0, -18.0, 6.0), (22.0, -8.0, 18.0))    # putamen, thalamus, corona radiata


@dataclass(frozen=True)
class Lumpiness:
    """Smooth random modulation of a radius over directions (unit vectors ``u``) or positions (``u`` = position /
    length scale): random Fourier features ``sum_k a_k cos(f_k (v_k . u) + phase_k)``, softly bounded."""

    directions: np.ndarray   # [K, 3] unit vectors
    frequencies: np.ndarray  # [K]
    phases: np.ndarray       # [K]
    amplitudes: np.ndarray   # [K]

    @classmethod
    def draw(cls, rng: np.random.Generator, amplitude: float, max_frequency: float = 4.0, terms: int = 8
             ) -> "Lumpiness":
        directions = rng.normal(size=(terms, 3))
        return cls(directions / np.linalg.norm(directions, axis=1, keepdims=True),
                   rng.uniform(1.0, max_frequency, terms), rng.uniform(0.0, 2 * np.pi, terms),
                   amplitude * rng.uniform(0.5, 1.0, terms) / np.sqrt(terms))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Relative radius change ``[...]`` in (-LUMP_BOUND, LUMP_BOUND) at ``points`` ``[3, ...]``."""
        broadcast = (-1, *[1] * (points.ndim - 1))
        projections = np.tensordot(self.directions.astype(points.dtype), points, axes=1)     # [K, ...]
        waves = np.cos(self.frequencies.astype(points.dtype).reshape(broadcast) * projections
                       + self.phases.astype(points.dtype).reshape(broadcast))
        return LUMP_BOUND * np.tanh(np.tensordot(self.amplitudes.astype(points.dtype), waves, axes=1) / LUMP_BOUND)


@dataclass(frozen=True)
class Tumour:
    centre_mm: np.ndarray       # [3] MNI
    radii_mm: np.ndarray        # [3] semi-axes of the enhancing (solid) part's outer boundary
    axes: np.ndarray            # [3, 3] rotation whose rows are the semi-axes' directions
    necrosis_fraction: float    # necrotic share of the solid volume
    enhancement: float          # [0, 1] contrast uptake of the solid rim on T1c
    oedema_extent: float        # oedema's outer radius relative to the solid part's
    mass_effect: float          # [0, 0.5) radial push of the surrounding tissue
    core_shape: Lumpiness
    oedema_shape: Lumpiness

    @property
    def volume_ml(self) -> float:
        return float(4.0 / 3.0 * np.pi * np.prod(self.radii_mm) / 1000.0)


@dataclass(frozen=True)
class Stroke:
    territory: str              # "MCA", "ACA", "PCA" (wedges) or "lacunar" (a small ball)
    side: float                 # +1 right hemisphere, -1 left
    apex_mm: np.ndarray         # [3] MNI; a lacune's centre
    direction: np.ndarray       # [3] unit vector the wedge opens along
    half_angle_deg: float       # 180 for a lacune
    inner_mm: float             # the wedge starts this far from its apex
    reach_mm: float             # ... and ends this far (the brain's surface usually cuts it first)
    months_since_stroke: float
    shape: Lumpiness


@dataclass(frozen=True)
class WhiteMatterLesions:
    centres_mm: np.ndarray      # [N, 3] MNI
    radii_mm: np.ndarray        # [N]


def _voxel_to_mm(template: Template, voxels: np.ndarray) -> np.ndarray:
    return voxels @ template.affine[:3, :3].T + template.affine[:3, 3]


def draw_tumour(rng: np.random.Generator, template: Template) -> Tumour:
    """A glioma-like tumour centred in deep hemispheric white matter; one latent grade drives necrosis,
    enhancement and oedema together."""
    grade = rng.uniform()
    radius = rng.uniform(8.0, 22.0)
    site = template.deep_white_sites[rng.integers(len(template.deep_white_sites))]
    return Tumour(
        centre_mm=_voxel_to_mm(template, site), radii_mm=radius * rng.uniform(0.8, 1.2, size=3),
        axes=Rotation.from_quat(rng.normal(size=4)).as_matrix(),         # a normalised Gaussian: uniform
        necrosis_fraction=float(0.6 * grade * rng.uniform(0.4, 1.0)),
        enhancement=float(np.clip(grade + rng.normal(0.0, 0.2), 0.05, 1.0)),
        oedema_extent=float(rng.uniform(1.3, 1.7) + 1.0 * grade), mass_effect=float(rng.uniform(0.15, 0.4)),
        core_shape=Lumpiness.draw(rng, 0.35), oedema_shape=Lumpiness.draw(rng, 0.7, max_frequency=7.0, terms=12))


def tumour_outcomes(rng: np.random.Generator, tumour: Tumour, age: float) -> tuple[int, float, int]:
    """``(mutation, time_months, event)``: an IDH-like mutation, likelier in young patients with frontal,
    non-necrotic, non-enhancing tumours; Weibull survival, longer with the mutation, shorter with necrosis,
    volume and age; uniform administrative censoring between 6 and 60 months."""
    frontal = float(tumour.centre_mm[1] > 0.0)
    logit = (1.0 - 3.0 * tumour.necrosis_fraction - 1.5 * tumour.enhancement + 1.0 * frontal - 0.04 * (age - 50.0)
             + rng.normal(0.0, 0.5))
    mutation = int(rng.uniform() < 1.0 / (1.0 + np.exp(-logit)))
    log_scale = (np.log(18.0) + 1.0 * mutation - 1.2 * tumour.necrosis_fraction
                 - 0.4 * np.log(tumour.volume_ml / 20.0) - 0.015 * (age - 55.0))
    death = np.exp(log_scale) * (-np.log(rng.uniform())) ** (1.0 / 1.4)
    censoring = rng.uniform(6.0, 60.0)
    return mutation, round(float(min(death, censoring)), 1), int(death <= censoring)


def draw_stroke(rng: np.random.Generator) -> Stroke:
    """An arterial-territory (MCA 60 %, PCA 15 %, ACA 10 %) or lacunar (15 %) infarct, 0.1-60 months old."""
    territory = rng.choice(["MCA", "PCA", "ACA", "lacunar"], p=[0.6, 0.15, 0.1, 0.15])
    side = float(rng.choice([-1.0, 1.0]))
    months = float(np.exp(rng.uniform(np.log(0.1), np.log(60.0))))
    if territory == "lacunar":
        centre = np.array(LACUNE_SITES_MM[rng.integers(len(LACUNE_SITES_MM))]) + rng.normal(0.0, 2.0, 3)
        return Stroke("lacunar", side, centre * [side, 1, 1], np.array([side, 0.0, 0.0]), 180.0, 0.0,
                      float(rng.uniform(3.0, 8.0)), months, Lumpiness.draw(rng, 0.2))
    apex, direction, (angle_low, angle_high) = TERRITORIES[territory]
    direction = Rotation.from_rotvec(rng.normal(0.0, 0.2, 3)).apply(np.array(direction) / np.linalg.norm(direction))
    mirror = np.array([side, 1.0, 1.0])
    return Stroke(str(territory), side, np.array(apex) * mirror, direction * mirror,
                  float(rng.uniform(angle_low, angle_high)), float(rng.uniform(0.0, 30.0)), 85.0, months,
                  Lumpiness.draw(rng, 0.5, max_frequency=9.0, terms=12))


def draw_white_matter_lesions(rng: np.random.Generator, template: Template, age: float) -> WhiteMatterLesions:
    """Periventricular hyperintensities, Poisson in number with a mean rising by one per 4 years after 45."""
    count = rng.poisson(max(age - 45.0, 0.0) / 4.0)
    sites = template.periventricular_sites[rng.integers(len(template.periventricular_sites), size=count)]
    return WhiteMatterLesions(_voxel_to_mm(template, sites), rng.uniform(1.5, 5.0, size=count))


def _local_mm(template: Template, coords: np.ndarray, centre_mm: np.ndarray, radius_mm: float):
    """``(region, offsets)``: output slices around a template point and the mm offsets ``[3, ...]`` of their
    voxels' template positions from it; ``(None, None)`` when the point is out of view."""
    centre = np.linalg.solve(template.affine[:3, :3], centre_mm - template.affine[:3, 3])
    half = radius_mm / template.spacing_mm
    region = output_region(coords, np.stack([centre - half, centre + half]), template.spacing_mm)
    if region is None:
        return None, None
    local = coords[(slice(None), *region)]
    offsets = np.tensordot(template.affine[:3, :3], local, axes=1) - (centre_mm - template.affine[:3, 3])[
        :, None, None, None]
    return region, offsets.astype(np.float32)


def _ramp(margin_mm: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre lies ``margin_mm`` inside an edge."""
    return np.clip(margin_mm / spacing_mm + 0.5, 0.0, 1.0)


def tumour_shapes(template: Template, coords: np.ndarray, tumour: Tumour):
    """``(region, shapes)``: for the output voxels in ``region``, the fractions ``{"solid", "necrosis",
    "oedema_zone"}`` ``[...]`` of nested lumpy ellipsoids; ``(None, None)`` when out of view."""
    reach = float(tumour.radii_mm.max() * tumour.oedema_extent * (1.0 + LUMP_BOUND)) + template.spacing_mm
    region, offsets = _local_mm(template, coords, tumour.centre_mm, reach)
    if region is None:
        return None, None
    distance = np.maximum(np.linalg.norm(offsets, axis=0), 1e-3)
    unit = offsets / distance
    scaled = np.tensordot(tumour.axes / tumour.radii_mm[:, None], offsets, axes=1)
    rho = np.linalg.norm(scaled, axis=0)                                  # 1 on the solid part's ellipsoid
    mm_per_rho = distance / np.maximum(rho, 1e-3)
    solid_edge = 1.0 + tumour.core_shape(unit)
    spacing = template.spacing_mm
    shapes = {
        "solid": _ramp((solid_edge - rho) * mm_per_rho, spacing),
        "necrosis": _ramp((solid_edge * tumour.necrosis_fraction ** (1 / 3) - rho) * mm_per_rho, spacing),
        "oedema_zone": _ramp((tumour.oedema_extent * (1.0 + tumour.oedema_shape(unit)) - rho) * mm_per_rho,
                             spacing),
    }
    return region, shapes


def push_tissue(template: Template, coords: np.ndarray, tumour: Tumour) -> None:
    """Mass effect, in place on ``coords``: tissue around the tumour is pushed outward (Gaussian radial profile
    of width 1.2 radii), which also shifts nearby ventricles and midline."""
    width = 1.2 * float(tumour.radii_mm.mean())
    region, offsets = _local_mm(template, coords, tumour.centre_mm, 3.0 * width)
    if region is None:
        return
    squared = (offsets ** 2).sum(0)
    shrink = tumour.mass_effect * np.exp(-squared / (2.0 * width ** 2))
    pull = np.linalg.solve(template.affine[:3, :3], offsets.reshape(3, -1)).reshape(offsets.shape)
    coords[(slice(None), *region)] -= pull * shrink


def insert_tumour(tissues: SubjectTissues, region, shapes: dict) -> np.ndarray:
    """Paint the tumour into ``tissues`` (in place) and return its label mask ``[X, Y, Z]`` uint8
    (1 necrosis, 2 oedema, 3 enhancing, 0 elsewhere). The solid part replaces brain tissue and CSF; vasogenic
    oedema invades white matter, sparing most of the cortex."""
    fractions = tissues.fractions
    shape = fractions["gm"].shape
    for name in ("necrosis", "enhancing", "oedema"):
        fractions.setdefault(name, np.zeros(shape, dtype=np.float32))
    local = {name: fractions[name][region] for name in ("csf", "gm", "wm", "necrosis", "enhancing", "oedema")}
    solid, necrotic = shapes["solid"], np.minimum(shapes["necrosis"], shapes["solid"])
    contents = local["csf"] + local["gm"] + local["wm"]
    local["necrosis"] += necrotic * contents
    local["enhancing"] += (solid - necrotic) * contents
    for name in ("csf", "gm", "wm"):
        local[name] *= 1.0 - solid
    zone = np.clip(shapes["oedema_zone"] - solid, 0.0, 1.0)
    local["oedema"] += zone * (local["wm"] + 0.3 * local["gm"])
    local["wm"] *= 1.0 - zone
    local["gm"] *= 1.0 - 0.3 * zone
    labels = np.zeros(shape, dtype=np.uint8)
    stack = np.stack([local[name] for name in TUMOUR_LABELS])            # [3, ...] in label order
    labels[region] = np.where(stack.sum(0) >= 0.5, np.argmax(stack, axis=0) + 1, 0)
    return labels


def insert_stroke(template: Template, coords: np.ndarray, tissues: SubjectTissues, stroke: Stroke) -> None:
    """Paint an infarct into ``tissues`` (in place). Acute tissue is oedematous ("infarct"); with time
    (``1 - exp(-months / 3)``) the core turns to CSF-filled cavitation and its border to gliosis."""
    lacune = stroke.half_angle_deg >= 180.0
    reach = stroke.reach_mm * (1.0 + LUMP_BOUND) if lacune else stroke.reach_mm
    region, offsets = _local_mm(template, coords, stroke.apex_mm, reach + template.spacing_mm)
    if region is None:
        return
    fractions = tissues.fractions
    shape = fractions["gm"].shape
    for name in ("infarct", "gliosis"):
        fractions.setdefault(name, np.zeros(shape, dtype=np.float32))
    local = {name: fractions[name][region] for name in ("csf", "gm", "wm", "infarct", "gliosis")}   # views
    spacing = template.spacing_mm
    tissue = local["gm"] + local["wm"]
    distance = np.maximum(np.linalg.norm(offsets, axis=0), 1e-3)
    candidates = (tissue > 0.0) & (distance < reach + spacing)
    if not lacune:
        angle = np.arccos(np.clip(np.tensordot(stroke.direction.astype(np.float32), offsets, axes=1) / distance,
                                  -1.0, 1.0))
        widest = np.radians(stroke.half_angle_deg) * (1.0 + LUMP_BOUND)
        candidates &= angle < widest + spacing / np.maximum(distance, spacing)
    index = np.nonzero(candidates)                      # the costly shape is evaluated on these voxels only
    offsets, distance = offsets[(slice(None), *index)], distance[index]
    hemisphere = _ramp(stroke.side * (offsets[0] + stroke.apex_mm[0]), spacing)
    if lacune:
        lumps = 1.0 + stroke.shape(offsets / distance)
    else:
        angle = angle[index]
        lumps = 1.0 + stroke.shape(offsets / STROKE_NOISE_MM)
        y_mm, z_mm = offsets[1] + stroke.apex_mm[1], offsets[2] + stroke.apex_mm[2]
        y_front, z_level, slope = TENTORIUM_MNI
        hemisphere *= np.maximum(_ramp(y_mm - y_front, spacing), _ramp(z_mm - z_level - slope * (y_mm + 60.0), spacing))

    def wedge(angle_scale: float, trim_mm: float) -> np.ndarray:
        """Lacune: a lumpy ball. Territory: a cone with an irregular opening angle, from inner_mm to reach_mm,
        above the tentorium."""
        if lacune:
            return _ramp(stroke.reach_mm * lumps - trim_mm - distance, spacing) * hemisphere
        half_angle = np.radians(stroke.half_angle_deg) * angle_scale * lumps
        return (_ramp((half_angle - angle) * distance, spacing) * _ramp(stroke.reach_mm - trim_mm - distance, spacing)
                * _ramp(distance - stroke.inner_mm - trim_mm, spacing) * hemisphere)

    full = wedge(1.0, 0.0)
    core = np.minimum(wedge(0.6, 3.0), full)
    tissue = tissue[index]
    chronic = 1.0 - np.exp(-stroke.months_since_stroke / 3.0)
    local["infarct"][index] += (1.0 - chronic) * full * tissue
    local["csf"][index] += chronic * core * tissue
    local["gliosis"][index] += chronic * (full - core) * tissue
    local["gm"][index] *= 1.0 - full
    local["wm"][index] *= 1.0 - full


def insert_white_matter_lesions(template: Template, coords: np.ndarray, tissues: SubjectTissues,
                                lesions: WhiteMatterLesions) -> None:
    """Turn white matter inside each lesion ball into gliosis (in place)."""
    fractions = tissues.fractions
    fractions.setdefault("gliosis", np.zeros(fractions["gm"].shape, dtype=np.float32))
    for centre, radius in zip(lesions.centres_mm, lesions.radii_mm):
        region, offsets = _local_mm(template, coords, centre, radius + 2.0 * template.spacing_mm)
        if region is None:
            continue
        ball = _ramp(radius - np.linalg.norm(offsets, axis=0), template.spacing_mm)
        white = fractions["wm"][region]
        changed = ball * white
        fractions["gliosis"][region] += changed
        white -= changed
