"""Perturbed test volumes → per-encoder slice features, one condition (perturbation, severity) at a time.

DataLoader worker processes read each test volume, perturb it (:func:`perturb_volume`) and put it through the
same ingest preprocessing as extraction; the main process embeds its slices with every encoder that shares that
preprocessing. A volume that fails (e.g. a perturbation left no foreground) comes back as an error value, never an
exception. Only one condition's features are held in memory at a time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


class PerturbedReader(torch.utils.data.Dataset):
    """Item ``i`` → dict(row (manifest index), slices [S, size, size] float16, z [S], geometry) or dict(row,
    cause, hint) for a volume that failed."""

    def __init__(self, records: list[dict], preprocessing, perturbation: str, severity: float, seed: int,
                 slice_stride: int, input_size: int, grid):
        self.records, self.preprocessing = records, preprocessing
        self.perturbation, self.severity, self.seed = perturbation, severity, seed
        self.slice_stride, self.input_size, self.grid = slice_stride, input_size, grid

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> dict:
        from functools import partial

        from braindino.encoder.volume import volume_geometry
        from braindino.ingest.worker import VolumeFailure, prepare_volume
        from braindino.robustness.perturbations import perturb_volume

        record = self.records[position]
        index = None if pd.isna(record.get("volume_index")) else int(record["volume_index"])
        perturb = partial(perturb_volume, perturbation=self.perturbation, severity=self.severity, seed=self.seed,
                          key=f"{record['path']}#{index}")
        read = prepare_volume(record["path"], index, self.preprocessing, perturb=perturb)
        if isinstance(read, VolumeFailure):
            return {"row": record["row"], "cause": read.cause, "hint": read.hint}
        volume, prepared = read
        step = self.slice_stride
        return {"row": record["row"], "slices": prepared.slices[::step], "z": prepared.z_indices[::step],
                "geometry": volume_geometry(volume, prepared, self.input_size, self.grid)}


class ConditionFeatures:
    """Features of one condition for one encoder, shaped like :class:`braindino.extract.Features` for
    :class:`braindino.probe.inputs.SubjectBags`: ``load(row)`` → dict(cls, mean_patch, z, hemispheres)."""

    def __init__(self, label: str, paths: dict[int, str]):
        self.label, self.paths, self.arrays = label, paths, {}

    def load(self, row: int) -> dict:
        return self.arrays[row]

    def path(self, row: int) -> str:
        return f"{self.paths[row]} ({self.label})"


def _identity(item):
    return item


def _single_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def embed_condition(encoders: list, manifest: pd.DataFrame, rows: list[int], perturbation: str,
                    severity: float, seed: int, slice_stride: int, workers: int, batch_size: int
                    ) -> tuple[dict[str, ConditionFeatures], list[dict]]:
    """Perturb manifest ``rows`` at ``severity`` and embed them with every encoder (``encoders``:
    [:class:`~braindino.probe.encoders.EncoderUnderTest`]) → ({encoder name: ConditionFeatures}, errors [{row, path,
    cause, hint}])."""
    label = f"{perturbation}={severity:g}"
    paths = {row: str(manifest.at[row, "path"]) for row in rows}
    features = {entry.name: ConditionFeatures(label, paths) for entry in encoders}
    groups: dict = {}   # PreprocessConfig -> encoders that share it
    for entry in encoders:
        groups.setdefault(entry.encoder.preprocessing, []).append(entry)
    records = [{"row": row, **manifest.loc[row].to_dict()} for row in rows]
    errors = {}
    for members in groups.values():
        first = members[0].encoder
        reader = PerturbedReader(records, first.preprocessing, perturbation, severity, seed, slice_stride,
                                 first.input_size, first.grid)
        loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=max(0, workers),
                                             collate_fn=_identity,
                                             worker_init_fn=_single_thread if workers > 0 else None)
        for item in loader:
            if "cause" in item:
                errors[item["row"]] = {"row": item["row"], "path": paths[item["row"]], "cause": item["cause"],
                                       "hint": item["hint"]}
                continue
            for entry in members:
                embedding = entry.encoder.embed_prepared(item["slices"], item["z"], item["geometry"],
                                                            batch_size=batch_size)
                features[entry.name].arrays[item["row"]] = {
                    "cls": embedding.cls, "mean_patch": embedding.mean_patch, "z": np.asarray(embedding.z),
                    "hemispheres": embedding.hemispheres}
    return features, list(errors.values())
