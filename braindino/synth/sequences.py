"""Tissue fractions -> MR images: per-sequence tissue signal, subject/scanner variation, bias field and Rician noise.

Images are ``[X, Y, Z]`` int16 in arbitrary scanner units (white matter around a few hundred to a few thousand).
"""

from dataclasses import dataclass

import numpy as np

from braindino.synth.anatomy import (
    SubjectTissues,
    smooth_random_field,
    upsample_controls,
)

SEQUENCES = ("T1w", "T2w", "FLAIR", "T1c")
# Relative signal of a voxel full of each tissue. Orderings follow clinical contrast: T1w WM > GM > CSF, fat bright;
# T2w CSF > GM > WM; FLAIR suppresses CSF so oedema, infarct and gliosis are the brightest; cortical bone is dark.
_T1 = {"csf": 0.20, "gm": 0.58, "wm": 0.85, "bone": 0.05, "marrow": 0.70, "fat": 1.00,
       "gliosis": 0.50, "infarct": 0.40, "oedema": 0.48, "enhancing": 0.55, "necrosis": 0.25}
SIGNAL = {
    "T1w": _T1,
    "T2w": {"csf": 1.00, "gm": 0.52, "wm": 0.38, "bone": 0.04, "marrow": 0.40, "fat": 0.72,
            "gliosis": 0.80, "infarct": 0.82, "oedema": 0.85, "enhancing": 0.62, "necrosis": 0.92},
    "FLAIR": {"csf": 0.06, "gm": 0.56, "wm": 0.42, "bone": 0.04, "marrow": 0.40, "fat": 0.68,
              "gliosis": 0.95, "infarct": 0.92, "oedema": 0.90, "enhancing": 0.66, "necrosis": 0.30},
    "T1c": _T1,
}
CONTRAST_UPTAKE = 0.75          # T1c signal added to enhancing tumour of enhancement 1
NOISE_REFERENCE = 0.5           # signal level the SNR refers to
TEXTURE_MM = 3.0                # spacing of the tissue-texture control grid
TEXTURE_AMPLITUDE = 0.04        # relative std of the multiplicative tissue texture


@dataclass(frozen=True)
class Acquisition:
    """Scanner and subject variation of one image."""

    sequence: str
    signal: dict[str, float]    # tissue -> relative signal after this subject's jitter (and contrast uptake)
    gain: float                 # scanner units per unit signal
    snr: float                  # NOISE_REFERENCE signal / Gaussian noise std
    bias_controls: np.ndarray   # [4, 4, 4] controls of the log bias field


def draw_acquisition(rng: np.random.Generator, sequence: str, enhancement: float = 0.0) -> Acquisition:
    """Random acquisition of ``sequence``: +-5 % tissue-signal jitter, gain, SNR 15-40, +-15 % bias field;
    on T1c the enhancing tumour gains ``CONTRAST_UPTAKE * enhancement``."""
    signal = {name: float(value * rng.lognormal(0.0, 0.05)) for name, value in SIGNAL[sequence].items()}
    if sequence == "T1c":
        signal["enhancing"] += CONTRAST_UPTAKE * enhancement
    return Acquisition(sequence=sequence, signal=signal, gain=float(rng.lognormal(np.log(800.0), 0.35)),
                       snr=float(rng.uniform(15.0, 40.0)),
                       bias_controls=rng.normal(0.0, 0.15, size=(4, 4, 4)).astype(np.float32))


def tissue_texture(rng: np.random.Generator, shape: tuple[int, int, int], spacing_mm: float) -> np.ndarray:
    """``[X, Y, Z]`` float32 smooth unit-variance noise (``TEXTURE_MM`` correlation) shared by a subject's images."""
    controls = tuple(min(n, int(np.ceil(n * spacing_mm / TEXTURE_MM)) + 1) for n in shape)
    return smooth_random_field(rng, shape, controls)


def render(tissues: SubjectTissues, acquisitions: list[Acquisition], texture: np.ndarray,
           rngs: list[np.random.Generator], skull_stripped: bool = False) -> dict[str, np.ndarray]:
    """``{sequence: [X, Y, Z] int16 image}``, one per acquisition: tissue-mixture signal x texture x bias field
    x gain, then Rician noise (magnitude of complex Gaussian noise) from the matching generator in ``rngs``.
    ``skull_stripped`` zeroes everything outside the skull's inner surface, like BraTS data; otherwise the air
    around the head keeps its noise floor."""
    names = list(tissues.fractions)
    weights = np.array([[a.signal[name] for name in names] for a in acquisitions], dtype=np.float32)   # [S, K]
    fractions = np.stack([tissues.fractions[name].ravel() for name in names])                            # [K, N]
    signals = (weights @ fractions).reshape(len(acquisitions), *texture.shape)                           # [S, X, Y, Z]
    del fractions
    textured = 1.0 + TEXTURE_AMPLITUDE * texture
    images = {}
    for acquisition, signal, rng in zip(acquisitions, signals, rngs):
        bias = np.exp(upsample_controls(acquisition.bias_controls, texture.shape))
        signal *= textured * (bias * np.float32(acquisition.gain))
        sigma = np.float32(acquisition.gain * NOISE_REFERENCE / acquisition.snr)
        real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
        imaginary = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
        image = np.hypot(real, imaginary)
        if skull_stripped:
            image[tissues.intracranial < 0.5] = 0.0
        images[acquisition.sequence] = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
    return images
