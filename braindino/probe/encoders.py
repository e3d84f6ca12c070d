"""The encoders compared in a probe, robustness or saliency run, and their features.

:class:`EncoderUnderTest` is one encoder under evaluation: the model under test first, then its baselines (a
random init of the model's architecture, the pixel baseline, extra specs). :func:`load_encoders` builds them;
:func:`extract_features` gives each its features folder (the encoders without one are extracted together, each
volume read once per distinct preprocessing) and the manifest rows it holds.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from braindino.errors import InputError

DEFAULT_BASELINES = ("random_like", "pixels")


def slug(name: str) -> str:
    """``name`` as a folder name: letters, digits, ``-_.``; everything else ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


@dataclass
class EncoderUnderTest:
    """One encoder of a run. ``role`` "model" (the first) or "baseline"; ``spec`` as given; ``slug`` its folder
    name; ``fingerprint`` and ``parameters`` (trainable parameter count) describe it after :meth:`release`;
    ``features`` (a :class:`~braindino.extract.Features` folder) and ``rows`` ({manifest row: features index
    position} of the volumes it embedded) are set by :func:`extract_features`."""

    name: str
    role: str
    spec: str
    encoder: object | None
    fingerprint: str = ""
    parameters: int = 0
    features: object | None = None
    rows: dict = field(default_factory=dict)

    def __post_init__(self):
        self.fingerprint = self.fingerprint or self.encoder.fingerprint
        self.parameters = self.parameters or self.encoder.trainable_parameters()

    @property
    def slug(self) -> str:
        return slug(self.name)

    def release(self) -> None:
        """Free the encoder's memory; its name, fingerprint and parameter count remain."""
        self.encoder = None


def _display_name(spec) -> str:
    return Path(spec).name if os.path.isdir(spec) else str(spec)


def load_encoders(model, baselines=(), default_baselines: bool = True, device=None) -> list[EncoderUnderTest]:
    """The model (a spec of :func:`~braindino.load_encoder`) first, then the baselines: ``DEFAULT_BASELINES``
    (unless ``default_baselines`` is False) and ``baselines`` (specs; ``random:``/``pixels`` copy the model's
    preprocessing). Raises InputError when two encoders would share a name."""
    from braindino import load_encoder

    loaded = load_encoder(model, device=device)
    encoders = [EncoderUnderTest(_display_name(model), "model", str(model), loaded)]
    specs = (list(DEFAULT_BASELINES) if default_baselines else []) + [str(b) for b in baselines]
    for spec in dict.fromkeys(specs):
        if spec == "scratch":
            raise InputError("--baseline", "scratch trains a network end to end on each training set's labels: "
                                           "only the probe runs it", "leave --baseline scratch out here")
        if spec == "random_like":   # a model that is itself random:<arch>:0 gets a baseline with other weights
            encoder = loaded.random_like(seed=0)
            if encoder.fingerprint == loaded.fingerprint:
                encoder = loaded.random_like(seed=1)
        else:
            encoder = load_encoder(spec, device=device, like=loaded)
        encoders.append(EncoderUnderTest(_display_name(spec), "baseline", spec, encoder))
    names = [e.name for e in encoders]
    if len(set(names)) != len(names):
        raise InputError("--baseline", "two encoders share a name", "give each baseline once")
    return encoders


def extract_features(encoders: list[EncoderUnderTest], used, features_root, model_features=None,
                     batch_size: int = 64, workers: int = 2, patch_tokens: bool = False, slice_stride: int = 1,
                     stage: str = "probe", tap=None) -> int:
    """Give every encoder its features of the manifest rows ``used`` (a ``read_manifest`` DataFrame) and their
    ``rows``; returns the number of (encoder, volume) pairs that could not be embedded.

    ``model_features``: an existing features folder of the model (checked against its fingerprint); every other
    encoder is extracted into (or reused from) ``features_root/<slug>/``, all of them together
    (:func:`~braindino.extract.extract_cohorts`; ``tap``: passed on, called with ``used``'s row labels)."""
    from braindino.extract import extract_cohorts, open_features
    from braindino.probe.inputs import check_fingerprint, feature_rows

    jobs = []
    for entry in encoders:
        if entry.role == "model" and model_features:
            entry.features = open_features(model_features)
            check_fingerprint(entry.features, entry.encoder, model_features)
        else:
            jobs.append((entry, Path(features_root) / entry.slug))
    if jobs:
        print(f"{stage}: features of {', '.join(e.name for e, _ in jobs)} -> {Path(features_root)}", file=sys.stderr)
        relabelled = None if tap is None else (tap[0], lambda position, slices: tap[1](int(used.index[position]),
                                                                                      slices))
        extracted = extract_cohorts([(entry.encoder, folder) for entry, folder in jobs], used, batch_size=batch_size,
                                    workers=workers, patch_tokens=patch_tokens, slice_stride=slice_stride,
                                    tap=relabelled)
        for (entry, _folder), (features, _report) in zip(jobs, extracted):
            entry.features = features
    failed = 0
    for entry in encoders:
        entry.rows = feature_rows(entry.features, used)
        failed += len(used) - len(entry.rows)
        if patch_tokens and entry.rows and "patch" not in entry.features.load(next(iter(entry.rows.values()))):
            raise InputError(entry.features.root, "features hold no patch tokens (segmentation decodes them)",
                             "extract with --patch-tokens, or leave out --features to extract here")
    return failed
