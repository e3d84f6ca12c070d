"""Embed a manifest's volumes with one or more frozen encoders, each into its own features folder (format:
:mod:`.features`).

DataLoader worker processes hash each volume once, then read and preprocess it once per distinct preprocessing
among the encoders (the ingest code of ``braindino prepare``; encoders whose preprocessing is equal share one
read); a bad volume comes back as an error value, never an exception. The main process hands each encoder's
slices to that encoder's own batcher, which gathers the slices of consecutive volumes into batches of
``batch_size`` (a batch may span volumes), runs the encoder, and writes the volume's features as soon as its last
slice is embedded. Each encoder sees exactly the volumes and batches a run of its own would, so its features are
the same bit for bit. A volume whose cache key (model fingerprint, preprocessing, file content, volume_index,
patch flag) already has a feature file in an encoder's folder is neither read nor embedded for that encoder,
unless that file predates the ``hemispheres`` tensor (then it is embedded again and overwritten). A features
folder belongs to one model (model.json): extracting another model's features into it is refused.
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
from braindino.extract.features import (ERRORS_CSV, FEATURE_COLUMNS, INDEX_CSV, MODEL_JSON, Features,
                                        feature_key, feature_slice_count, read_model_json, volume_file, write_table,
                                        write_volume_features)
from braindino.ingest.worker import ERROR_COLUMNS, VolumeFailure, error_record, prepare_volume, volume_failure


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


def _failure(failure: VolumeFailure) -> dict:
    """A failed read as an item: status "failed", cause and hint."""
    return {"status": "failed", "cause": failure.cause, "hint": failure.hint}


class _VolumeReader(torch.utils.data.Dataset):
    """Item ``i`` → dict(position, members: {target number: result}) for every target (encoder) of the run.

    A result is dict(status "cached" | "read" | "failed", key, content_hash, n_slices (cached), slices
    [S, size, size] float16 and z [S] (read; one array shared by the targets of a group), geometry (read), cause and
    hint (failed)). ``groups``: [(PreprocessConfig, [(target number, features root, model.json dict)])], one
    group per distinct preprocessing: a group's volume is read only when one of its targets has no cached file.
    Runs in DataLoader workers.
    """

    def __init__(self, rows: list[dict], groups: list[tuple[dict, list]], patch_tokens: bool, slice_stride: int):
        self.rows, self.groups, self.patch_tokens, self.slice_stride = rows, groups, patch_tokens, slice_stride

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict:
        from braindino.ingest import content_hash

        row = self.rows[position]
        index = None if pd.isna(row.get("volume_index")) else int(row["volume_index"])
        try:
            digest = content_hash(row["path"])
        except Exception as err:
            failed = _failure(volume_failure(err))
            return {"position": position, "members": {number: dict(failed) for _, targets in self.groups
                                                      for number, _, _ in targets}}
        members = {}
        for preprocessing, targets in self.groups:
            members.update(self._read_group(row["path"], index, digest, preprocessing, targets))
        return {"position": position, "members": members}

    def _read_group(self, path, index, digest: str, preprocessing, targets: list) -> dict:
        """{target number: result} for the targets of one preprocessing: cache checks, then one read if needed."""
        from braindino.encoder.volume import volume_geometry

        results, missing = {}, []
        for number, root, model in targets:
            try:
                key = feature_key(model["fingerprint"], preprocessing.to_dict(), digest, index, self.patch_tokens,
                                  self.slice_stride)
                cached = root / volume_file(key)
                n_slices = feature_slice_count(cached) if cached.is_file() else None
            except Exception as err:
                results[number] = _failure(volume_failure(err))
                continue
            if n_slices is not None:
                results[number] = {"status": "cached", "key": key, "content_hash": digest, "n_slices": n_slices}
            else:
                missing.append((number, model, key))
        if not missing:
            return results
        read = prepare_volume(path, index, preprocessing)
        if isinstance(read, VolumeFailure):
            return {**results, **{number: _failure(read) for number, _, _ in missing}}
        volume, prepared = read
        step = self.slice_stride
        slices, z = prepared.slices[::step], prepared.z_indices[::step]
        for number, model, key in missing:
            results[number] = {"status": "read", "key": key, "content_hash": digest, "slices": slices, "z": z,
                               "geometry": volume_geometry(volume, prepared, model["input_size"], model["grid"])}
        return results


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


def _prepare_folders(targets: list) -> None:
    """Refuse a folder given twice or holding another model's features (before anything is written), then write
    each folder's model.json. ``targets``: [(root, model.json dict)]."""
    from braindino.atomic import atomic_write_json

    seen = set()
    for root, model in targets:
        if root.resolve() in seen:
            raise InputError(root, "is the features folder of two encoders of this run",
                             "give each encoder its own folder")
        seen.add(root.resolve())
        existing = read_model_json(root)
        if existing is not None and existing["fingerprint"] != model["fingerprint"]:
            raise InputError(root, f"holds features of another model ({existing['name']}, fingerprint "
                             f"{existing['fingerprint']}); this model is {model['name']} ({model['fingerprint']})",
                             "choose another --out folder (one features folder per model), or delete this one")
    for root, model in targets:
        atomic_write_json(root / MODEL_JSON, model)


def auto_reader_workers(encoders) -> int:
    """Reader processes for ``workers=None``: ``min(4, cores)`` when an encoder runs on a GPU; on a CPU only the
    cores torch's own threads leave free. A reader beside the encoder's threads on a shared core stalls their
    matrix products at every barrier, which cost more than reading in this process (2 cores, ViT-Ti: extraction
    ÷ encoder-only 1.25 with one reader, 1.14 with none; README, Performance)."""
    cores = len(os.sched_getaffinity(0))
    if any(encoder.device.type != "cpu" for encoder in encoders):
        return min(4, cores)
    return max(0, min(4, cores - torch.get_num_threads()))


def embed_cohort(encoder, manifest, cache_dir=None, batch_size: int = 64, workers: int | None = None,
                 patch_tokens: bool = False, progress: bool = True, slice_stride: int = 1) -> Features:
    """Embed every volume of ``manifest`` (CSV path or ``read_manifest`` DataFrame) with ``encoder`` into the
    features folder ``cache_dir`` (default: ``~/.cache/braindino/features/<fingerprint>``) → the opened
    :class:`~braindino.extract.Features`. :func:`extract_cohort` also returns the run's report."""
    features, _report = extract_cohort(encoder, manifest, cache_dir or default_cache_dir(encoder.fingerprint),
                                       batch_size=batch_size, workers=workers, patch_tokens=patch_tokens,
                                       progress=progress, slice_stride=slice_stride)
    return features


def extract_cohort(encoder, manifest, out, batch_size: int = 64, workers: int | None = None,
                   patch_tokens: bool = False,
                   progress: bool = True, slice_stride: int = 1) -> tuple[Features, ExtractReport]:
    """Embed the volumes of ``manifest`` (CSV path or ``read_manifest`` DataFrame) into the folder ``out``.

    ``workers``: reader processes (0: read in this process; None: ``auto_reader_workers``).
    ``slice_stride`` k > 1 embeds every k-th kept slice only (k times less compute; adjacent 1 mm slices are nearly
    redundant for volume-level endpoints); ``z`` records which slices they are.

    Manifest-level problems and a folder of another model raise InputError; bad volumes are reported on stderr
    (one line each) and in ``errors.csv``. Returns the opened features folder and the run's report. One encoder's
    case of :func:`extract_cohorts`.
    """
    return extract_cohorts([(encoder, out)], manifest, batch_size, workers, patch_tokens, progress, slice_stride)[0]


@dataclass
class _Target:
    """One encoder's side of a run: its folder, model.json, batcher, report and index entries
    ({manifest position: (key, content_hash, n_slices)})."""

    encoder: object
    root: Path
    model: dict
    batcher: _SliceBatcher
    report: ExtractReport = field(default_factory=ExtractReport)
    entries: dict = field(default_factory=dict)


def extract_cohorts(jobs: list[tuple], manifest, batch_size: int = 64, workers: int | None = None,
                    patch_tokens: bool = False, progress: bool = True, slice_stride: int = 1,
                    tap=None) -> list[tuple[Features, ExtractReport]]:
    """Embed the volumes of ``manifest`` with several encoders: ``jobs`` = [(encoder, features folder)], one
    folder per encoder. Each volume is hashed once and read and preprocessed once per distinct preprocessing; each
    folder ends up as :func:`extract_cohort` of its encoder alone would write it (the same files, bit for bit).

    Manifest-level problems, a folder given twice and a folder of another model raise InputError before anything
    is written; a bad volume is one line on stderr (once, whichever encoders it failed for) and a row of each
    affected folder's ``errors.csv``. Returns [(opened features folder, that encoder's report)] in ``jobs`` order;
    every report's ``seconds`` is the whole run's.

    ``tap`` = (PreprocessConfig, callback): ``callback(manifest position, slices [S, size, size] float16)`` for every
    volume read with that preprocessing (its slices after ``slice_stride``; volumes served from the cache are not
    read, so not tapped) — another consumer of the same slices (the probe's end-to-end rows) need not read again.
    """
    from braindino.extract.features import open_features
    from braindino.manifest import read_manifest

    started = time.perf_counter()
    if slice_stride < 1:
        raise ValueError(f"slice_stride must be at least 1, got {slice_stride}")
    table = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    targets = [_Target(encoder, Path(out), encoder.model_info(), _SliceBatcher(encoder, max(1, batch_size),
                                                                               patch_tokens))
               for encoder, out in jobs]
    _prepare_folders([(t.root, t.model) for t in targets])
    groups: dict = {}   # PreprocessConfig -> [(target number, root, model.json)]
    for number, target in enumerate(targets):
        groups.setdefault(target.encoder.preprocessing, []).append((number, target.root, target.model))
    rows = table.to_dict("records")
    if workers is None:
        workers = auto_reader_workers([target.encoder for target in targets])
    reader = _VolumeReader(rows, list(groups.items()), patch_tokens, slice_stride)
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=max(0, workers), collate_fn=_as_is,
                                         worker_init_fn=_worker_init if workers > 0 else None)
    bar = tqdm(total=len(rows) * len(targets), desc="extract" if len(targets) == 1 else
               f"extract ({len(targets)} encoders)", unit="vol", disable=not progress, file=sys.stderr)

    def store(target: _Target, item: dict) -> None:
        out_ = item["embedded"]
        write_volume_features(target.root / volume_file(item["key"]), out_["cls"], out_["mean_patch"], item["z"],
                              item["geometry"], out_.get("patch"), out_["hemispheres"])
        target.entries[item["position"]] = (item["key"], item["content_hash"], len(item["z"]))
        target.report.computed += 1
        target.report.slices += len(item["z"])
        bar.update(1)

    tapped = next((n for n, t in enumerate(targets) if tap is not None and t.encoder.preprocessing == tap[0]), None)
    for item in loader:
        row, printed = rows[item["position"]], set()
        for number, result in sorted(item["members"].items()):
            if number == tapped and result["status"] == "read":
                tap[1](item["position"], result["slices"])
            target = targets[number]
            if result["status"] == "failed":
                target.report.errors.append(error_record(row, VolumeFailure(result["cause"], result["hint"])))
                if (result["cause"], result["hint"]) not in printed:
                    printed.add((result["cause"], result["hint"]))
                    bar.write(f"error: {row['path']}: {result['cause']} — {result['hint']}", file=sys.stderr)
                bar.update(1)
            elif result["status"] == "cached":
                target.entries[item["position"]] = (result["key"], result["content_hash"], result["n_slices"])
                target.report.cached += 1
                bar.update(1)
            else:
                for finished in target.batcher.add({"position": item["position"], **result}):
                    store(target, finished)
    for target in targets:
        for finished in target.batcher.finish():
            store(target, finished)
    bar.close()
    seconds = time.perf_counter() - started
    for target in targets:
        _write_index(target.root, table, target.entries, target.encoder.fingerprint)
        write_table(target.root / ERRORS_CSV, pd.DataFrame(target.report.errors, columns=ERROR_COLUMNS))
        target.report.seconds = seconds
    return [(open_features(target.root), target.report) for target in targets]


def _write_index(root: Path, table: pd.DataFrame, entries: dict, fingerprint: str) -> None:
    """index.csv: the embedded manifest rows in manifest order, plus FEATURE_COLUMNS."""
    positions = sorted(entries)
    index = table.iloc[positions].reset_index(drop=True).copy()
    index["feature_file"] = [volume_file(entries[p][0]) for p in positions]
    index["model_fingerprint"] = fingerprint
    index["content_hash"] = [entries[p][1] for p in positions]
    index["n_slices"] = [entries[p][2] for p in positions]
    write_table(root / INDEX_CSV, index[[c for c in index.columns if c not in FEATURE_COLUMNS] + FEATURE_COLUMNS])
