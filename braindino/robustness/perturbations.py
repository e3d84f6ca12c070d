"""What a different scanner does to a volume, at a grid of severities, applied BEFORE ingestion.

A perturbation acts on a loaded volume (``load_volume``: RAS canonical ``[X, Y, Z]``, a lossless reorientation of
the file), whose perturbed copy then goes through the usual preprocessing (robust normalisation, resampling, crop,
slice selection) — so the encoder sees what it would see had the scanner produced that image. The in-plane physics
are the training augmentations' own deterministic functions (:mod:`braindino.augment.intensity`) applied to the
axial planes ``[Z, 1, X, Y]``; noise and thick slices come from :mod:`braindino.robustness.physics`.

Intensities are divided by the volume's robust maximum (99.5th percentile of its positive voxels) before the
physics and multiplied back after, so gamma keeps 0 and that maximum fixed and noise levels are fractions of it.

Every random draw (bias-field shape, noise) comes from ``SeedSequence([seed, perturbation index, crc32(key)])``
with ``key`` naming the volume: the same seed gives the same perturbed volume, whatever else the run holds.
Every perturbation is the identity at its ``identity`` severity.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from braindino.augment.intensity import add_ghosting, adjust_gamma, apply_bias_field, gibbs_ringing
from braindino.errors import InputError
from braindino.ingest import Volume
from braindino.robustness.physics import add_gaussian_noise, add_rician_noise, thick_slices

ROBUST_MAX_PERCENTILE = 99.5
BIAS_FIELD_ORDER = 3
GHOST_COUNT = 4               # every 4th k-space line attenuated: 4-fold ghosts
GHOST_AXIS = 1                # along the canonical Y (anterior-posterior), a common phase-encoding direction


@dataclass(frozen=True)
class Perturbation:
    """``apply(planes [Z, 1, X, Y] float32 in about [0, 1], severity, rng numpy Generator) -> same shape``;
    ``parameter`` names the severity axis (e.g. "gamma"); ``severities`` is the default grid."""

    name: str
    parameter: str
    severities: tuple[float, ...]
    identity: float
    apply: Callable[[torch.Tensor, float, np.random.Generator], torch.Tensor]
    description: str


def _batch(planes: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((planes.shape[0],), float(value), dtype=planes.dtype)


def _torch_generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))


def _gamma(planes, severity, rng):
    return adjust_gamma(planes, _batch(planes, severity))


def _bias_field(planes, severity, rng):
    n_terms = (BIAS_FIELD_ORDER + 1) * (BIAS_FIELD_ORDER + 2) // 2
    shape = torch.as_tensor(rng.uniform(-1.0, 1.0, n_terms), dtype=planes.dtype)          # one field per volume
    return apply_bias_field(planes, (severity * shape).expand(planes.shape[0], n_terms))


def _gibbs(planes, severity, rng):
    return gibbs_ringing(planes, _batch(planes, 1.0 - severity))


def _gaussian_noise(planes, severity, rng):
    return add_gaussian_noise(planes, _batch(planes, severity), _torch_generator(rng))


def _rician_noise(planes, severity, rng):
    return add_rician_noise(planes, _batch(planes, severity), _torch_generator(rng))


def _ghosting(planes, severity, rng):
    count = torch.full((planes.shape[0],), GHOST_COUNT, dtype=torch.long)
    axis = torch.full((planes.shape[0],), GHOST_AXIS, dtype=torch.long)
    return add_ghosting(planes, count, _batch(planes, severity), axis)


def _thick_slices(planes, severity, rng):
    return thick_slices(planes, int(round(severity)))


PERTURBATIONS: dict[str, Perturbation] = {p.name: p for p in (
    Perturbation("gamma", "gamma", (0.5, 0.7, 1.0, 1.3, 1.6, 1.9), 1.0, _gamma,
                 "tissue contrast: x ** gamma"),
    Perturbation("bias_field", "coefficient", (0.0, 0.15, 0.3, 0.45), 0.0, _bias_field,
                 "smooth multiplicative field exp(sum c_k x^i y^j), cubic, |c_k| <= coefficient"),
    Perturbation("gibbs", "alpha", (0.0, 0.15, 0.3, 0.45), 0.0, _gibbs,
                 "Gibbs ringing: k-space truncated to the central 1 - alpha of each in-plane axis"),
    Perturbation("gaussian_noise", "sigma", (0.0, 0.03, 0.06, 0.1), 0.0, _gaussian_noise,
                 "additive Gaussian noise, sigma as a fraction of the robust maximum"),
    Perturbation("rician_noise", "sigma", (0.0, 0.03, 0.06, 0.1), 0.0, _rician_noise,
                 "magnitude of complex Gaussian noise (Rician), sigma as a fraction of the robust maximum"),
    Perturbation("ghosting", "intensity", (0.0, 0.2, 0.4, 0.6), 0.0, _ghosting,
                 f"motion-like ghosting: every {GHOST_COUNT}th phase-encoding line attenuated by intensity"),
    Perturbation("thick_slices", "factor", (1.0, 2.0, 3.0, 4.0), 1.0, _thick_slices,
                 "lower through-plane resolution: factor-times thicker axial slices, resampled back"),
)}
PERTURBATION_ORDER = tuple(PERTURBATIONS)


def volume_rng(seed: int, perturbation: str, key: str) -> np.random.Generator:
    """The random generator of one (seed, perturbation, volume) triple."""
    return np.random.default_rng(np.random.SeedSequence(
        [int(seed), PERTURBATION_ORDER.index(perturbation), zlib.crc32(str(key).encode("utf-8"))]))


def perturb_array(data: np.ndarray, perturbation: str, severity: float, seed: int, key: str) -> np.ndarray:
    """``data`` ``[X, Y, Z]`` (RAS canonical, axial planes ``data[:, :, z]``) → perturbed ``[X, Y, Z]`` float32."""
    spec = PERTURBATIONS[perturbation]
    positive = data[data > 0]
    scale = float(np.percentile(positive, ROBUST_MAX_PERCENTILE)) if positive.size else 1.0
    planes = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 0, 1), dtype=np.float32))[:, None] / scale
    perturbed = spec.apply(planes, float(severity), volume_rng(seed, perturbation, key))
    return np.ascontiguousarray((perturbed[:, 0] * scale).numpy().transpose(1, 2, 0), dtype=np.float32)


def perturb_volume(volume: Volume, perturbation: str, severity: float, seed: int, key: str | None = None) -> Volume:
    """A copy of ``volume`` (from ``load_volume``) with perturbed ``data``; ``key`` (default: its source path)
    names the volume in the random draws."""
    data = perturb_array(volume.data, perturbation, severity, seed, volume.source_path if key is None else key)
    return replace(volume, data=data)


def parse_grid(names: list[str] | None, overrides: list[str]) -> dict[str, tuple[float, ...]]:
    """{perturbation: severities} for ``names`` (default: all, in PERTURBATION_ORDER) with ``overrides``
    ``["gibbs=0,0.2,0.4", ...]`` replacing a default grid; the identity severity is always included."""
    chosen = list(names) if names else list(PERTURBATION_ORDER)
    unknown = [name for name in chosen if name not in PERTURBATIONS]
    if unknown:
        raise InputError("--perturbations", f"unknown perturbation(s) {', '.join(unknown)}",
                         f"choose among {', '.join(PERTURBATION_ORDER)}")
    grid = {name: PERTURBATIONS[name].severities for name in chosen}
    for text in overrides:
        name, _, values = text.partition("=")
        if name not in grid:
            raise InputError("--grid", f"{text!r} names no chosen perturbation",
                             f"write NAME=v1,v2 with NAME among {', '.join(grid)}")
        try:
            severities = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise InputError("--grid", f"{text!r} is not NAME=v1,v2,...", "write e.g. --grid gibbs=0,0.2,0.4") from None
        if not severities:
            raise InputError("--grid", f"{text!r} lists no severity", "write e.g. --grid gibbs=0,0.2,0.4")
        grid[name] = tuple(severities)
    return {name: tuple(sorted(set(values) | {PERTURBATIONS[name].identity})) for name, values in grid.items()}
