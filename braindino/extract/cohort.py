"""Embed a manifest's volumes with a frozen encoder into a features folder (format: :mod:`.features`).

DataLoader worker processes hash, read and preprocess volumes (the ingest code of ``braindino prepare``); a bad
volume comes back as an error value, never an exception. The main process gathers the slices of consecutive
volumes into batches of ``batch_size`` (a batch may span volumes), runs the encoder, and writes each volume's
features as soon as its last slice is embedded. A volume whose cache key (model fingerprint, preprocessing, file
content, volume_index, patch flag) already has a feature file is not read again, unless that file predates the
``hemispheres`` tensor (then it is embedded again and overwritten). A features folder belongs to one model
(model.json): extracting another model's features into it is refused.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from braindino.errors import InputError
from braindino.extract.features import (ERROR_COLUMNS, ERRORS_CSV, FEATURE_COLUMNS, INDEX_CSV, MODEL_JSON, Features,
                                        feature_key, feature_slice_count, read_model_json, volume_file, write_table,
                                        write_volume_features)

UNEXPECTED_HINT = "check that the file is an intact 3D MRI volume; report a bug if it is"


def default_cache_dir(fingerprint: str) -> Path:
    """``$BRAINDINO_CACHE`` (default ``~/.cache/braindino``) ``/features/<fingerprint>``."""
    root = os.environ.get("BRAINDINO_CACHE") or Path.home() / ".cache" / "braindino"
    return Path(root) / "features" / fingerprint


@dataclass
class ExtractReport:
    """What one extraction did; ``errors`` holds one dict per failed row (ERROR_COLUMNS)."""

    computed: int = 0
    cached: int = 0
    slices: int = 0
    seconds: float = 0.0
    errors: list = field(default_factory=list)

    def summary(self) -> str:
        if self.computed == 0 and not self.errors:
            return f"{self.cached} volumes cached, nothing to compute"
        failed = f", {len(self.errors)} failed" if self.errors else ""
        return (f"{self.computed + self.cached} volumes embedded ({self.computed} computed, {self.slices} slices; "
                f"{self.cached} cached){failed} in {self.seconds:.1f}s")


class _VolumeReader(torch.utils.data.Dataset):
    """Item ``i`` → dict(position, status "cached" | "read" | "failed", key, content_hash, slices [S, size, size]
    float16, z [S], geometry, cause, hint). Runs in DataLoader workers."""

    def __init__(self, rows: list[dict], root: Path, model: dict, patch_tokens: bool, slice_stride: int):
        self.rows, self.root, self.model, self.patch_tokens = rows, root, model, patch_tokens
        self.slice_stride = slice_stride

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict:
        from braindino.encoder.load import preprocessing_from_dict
        from braindino.encoder.volume import ingest_source, volume_geometry
        from braindino.ingest import content_hash

        row = self.rows[position]
        index = None if pd.isna(row.get("volume_index")) else int(row["volume_index"])
        try:
            digest = content_hash(row["path"])
            key = feature_key(self.model["fingerprint"], self.model["preprocessing"], digest, index,
                              self.patch_tokens, self.slice_stride)
            cached = self.root / volume_file(key)
            n_slices = feature_slice_count(cached) if cached.is_file() else None
            if n_slices is not None:
                return {"position": position, "status": "cached", "key": key, "content_hash": digest,
                        "n_slices": n_slices}
            volume, prepared = ingest_source(row["path"], index, preprocessing_from_dict(self.model["preprocessing"]))
        except InputError as err:
            return {"position": position, "status": "failed", "cause": err.cause, "hint": err.hint}
        except Exception as err:   # a reader failing in a way ingest does not recognise
            lines = str(err).strip().splitlines()
            cause = f"unexpected error {type(err).__name__}" + (f": {lines[0]}" if lines else "")
            return {"position": position, "status": "failed", "cause": cause, "hint": UNEXPECTED_HINT}
        geometry = volume_geometry(volume, prepared, self.model["input_size"], self.model["grid"])
        step = self.slice_stride
        return {"position": position, "status": "read", "key": key, "content_hash": digest,
                "slices": prepared.slices[::step], "z": prepared.z_indices[::step], "geometry": geometry}


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def _as_is(item: dict) -> dict:
    """DataLoader "collate" for single items: keep numpy arrays as they are (no conversion to tensors)."""
    return item


class _SliceBatcher:
    """Collects the slices of whole volumes and embeds them ``batch_size`` at a time, across volume borders;
    ``pending`` holds volumes not yet fully embedded, ``done`` those that are (outputs concatenated)."""

    def __init__(self, encoder, batch_size: int, patch_tokens: bool):
        self.encoder, self.batch_size, self.patch_tokens = encoder, batch_size, patch_tokens
        self.pending: list[dict] = []
        self.queued = 0

    def add(self, item: dict) -> list[dict]:
        item["outputs"], item["next"] = [], 0
        self.pending.append(item)
        self.queued += len(item["slices"])
        return self._run(final=False)

    def finish(self) -> list[dict]:
        return self._run(final=True)

    def _run(self, final: bool) -> list[dict]:
        finished = []
        while self.queued >= self.batch_size or (final and self.queued):
            take, parts = min(self.batch_size, self.queued), []
            for item in self.pending:
                count = min(take - sum(len(p[1]) for p in parts), len(item["slices"]) - item["next"])
                if count > 0:
                    parts.append((item, item["slices"][item["next"]:item["next"] + count]))
                    item["next"] += count
            out = self.encoder.embed_slices(torch.from_numpy(np.concatenate([p[1] for p in parts]))[:, None],
                                            self.patch_tokens)
            start = 0
            for item, chunk in parts:
                item["outputs"].append({k: v[start:start + len(chunk)].numpy() for k, v in out.items()})
                start += len(chunk)
            self.queued -= take
            while self.pending and self.pending[0]["next"] == len(self.pending[0]["slices"]):
                item = self.pending.pop(0)
                item["embedded"] = {k: np.concatenate([o[k] for o in item["outputs"]]) for k in item["outputs"][0]}
                finished.append(item)
        return finished


def _prepare_folder(root: Path, model: dict) -> None:
    existing = read_model_json(root)
    if existing is not None and existing["fingerprint"] != model["fingerprint"]:
        raise InputError(root, f"holds features of another model ({existing['name']}, fingerprint "
                         f"{existing['fingerprint']}); this model is {model['name']} ({model['fingerprint']})",
                         "choose another --out folder (one features folder per model), or delete this one")
    from braindino.atomic import atomic_write_json

    atomic_write_json(root / MODEL_JSON, model)


def extract_cohort(encoder, manifest, out, batch_size: int = 64, workers: int = 2, patch_tokens: bool = False,
                   progress: bool = True, slice_stride: int = 1) -> tuple[Features, ExtractReport]:
    """Embed the volumes of ``manifest`` (CSV path or ``read_manifest`` DataFrame) into the folder ``out``.

    ``slice_stride`` k > 1 embeds every k-th kept slice only (k times less compute; adjacent 1 mm slices are nearly
    redundant for volume-level endpoints); ``z`` records which slices they are.

    Manifest-level problems and a folder of another model raise InputError; bad volumes are reported on stderr
    (one line each) and in ``errors.csv``. Returns the opened features folder and the run's report.
    """
    from braindino.extract.features import open_features
    from braindino.manifest import read_manifest

    started = time.perf_counter()
    table = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    root, model = Path(out), encoder.model_info()
    _prepare_folder(root, model)
    rows = table.to_dict("records")
    if slice_stride < 1:
        raise ValueError(f"slice_stride must be at least 1, got {slice_stride}")
    reader = _VolumeReader(rows, root, model, patch_tokens, slice_stride)
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=max(0, workers), collate_fn=_as_is,
                                         worker_init_fn=_worker_init if workers > 0 else None)
    batcher, report, entries = _SliceBatcher(encoder, max(1, batch_size), patch_tokens), ExtractReport(), {}
    bar = tqdm(total=len(rows), desc="extract", unit="vol", disable=not progress, file=sys.stderr)

    def store(item: dict) -> None:
        out_ = item["embedded"]
        write_volume_features(root / volume_file(item["key"]), out_["cls"], out_["mean_patch"], item["z"],
                              item["geometry"], out_.get("patch"), out_["hemispheres"])
        entries[item["position"]] = (item["key"], item["content_hash"], len(item["z"]))
        report.computed += 1
        report.slices += len(item["z"])
        bar.update(1)

    for item in loader:
        if item["status"] == "failed":
            row = rows[item["position"]]
            report.errors.append({"path": row["path"], "subject": row["subject"], "sequence": row.get("sequence", ""),
                                  "cause": item["cause"], "hint": item["hint"]})
            bar.write(f"error: {row['path']}: {item['cause']} — {item['hint']}", file=sys.stderr)
            bar.update(1)
        elif item["status"] == "cached":
            entries[item["position"]] = (item["key"], item["content_hash"], item["n_slices"])
            report.cached += 1
            bar.update(1)
        else:
            for finished in batcher.add(item):
                store(finished)
    for finished in batcher.finish():
        store(finished)
    bar.close()
    _write_index(root, table, entries, encoder.fingerprint)
    write_table(root / ERRORS_CSV, pd.DataFrame(report.errors, columns=ERROR_COLUMNS))
    report.seconds = time.perf_counter() - started
    return open_features(root), report


def _write_index(root: Path, table: pd.DataFrame, entries: dict, fingerprint: str) -> None:
    """index.csv: the embedded manifest rows in manifest order, plus FEATURE_COLUMNS."""
    positions = sorted(entries)
    index = table.iloc[positions].reset_index(drop=True).copy()
    index["feature_file"] = [volume_file(entries[p][0]) for p in positions]
    index["model_fingerprint"] = fingerprint
    index["content_hash"] = [entries[p][1] for p in positions]
    index["n_slices"] = [entries[p][2] for p in positions]
    write_table(root / INDEX_CSV, index[[c for c in index.columns if c not in FEATURE_COLUMNS] + FEATURE_COLUMNS])
