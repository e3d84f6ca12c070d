"""``PreprocessConfig``: how volumes become slices — one frozen, hashable value, the key of every cache and group.

Its JSON form (:meth:`PreprocessConfig.to_dict`, lists for tuples) is what ``store.json``, ``model.json`` and a model
folder's ``config.json`` hold; :meth:`PreprocessConfig.from_dict` reads it back. Two configs are equal exactly when
their dicts are, so extraction groups encoders by the config itself and cache keys hash its dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FOREGROUND_METHODS = ("auto", "nonzero", "otsu")


@dataclass(frozen=True)
class PreprocessConfig:
    """How volumes become slices; see :mod:`braindino.ingest.preprocess` for the pipeline."""

    spacing_mm: float = 1.0
    size: int = 224
    foreground: str = "auto"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    min_foreground_fraction: float = 0.05

    def __post_init__(self):
        object.__setattr__(self, "clip_percentiles", tuple(self.clip_percentiles))
        low, high = self.clip_percentiles
        if not self.spacing_mm > 0:
            raise ValueError(f"spacing_mm must be positive, got {self.spacing_mm}")
        if self.size < 1:
            raise ValueError(f"size must be at least 1, got {self.size}")
        if self.foreground not in FOREGROUND_METHODS:
            raise ValueError(f"foreground must be one of {FOREGROUND_METHODS}, got {self.foreground!r}")
        if not 0 <= low < high <= 100:
            raise ValueError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {self.clip_percentiles}")
        if not 0 <= self.min_foreground_fraction <= 1:
            raise ValueError(f"min_foreground_fraction must be in [0, 1], got {self.min_foreground_fraction}")

    def to_dict(self) -> dict:
        """The JSON form: ``{"spacing_mm", "size", "foreground", "clip_percentiles": [low, high],
        "min_foreground_fraction"}``."""
        values = asdict(self)
        values["clip_percentiles"] = list(self.clip_percentiles)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessConfig:
        """Inverse of :meth:`to_dict` (a tuple or a list for ``clip_percentiles``)."""
        return cls(**values)
