"""``prepare_store``: ingest every volume of a manifest into a slice store, in parallel, resumably.

Worker processes hash, load and preprocess volumes (``braindino.ingest``); the parent appends their slices to the
open shard in manifest order and commits shards and index as they fill (see :mod:`braindino.store.format`).
A volume whose file hash matches its stored copy is skipped (its manifest columns are refreshed); a changed file
is ingested again and replaces its old copy. Each volume that cannot be stored gets one line — file, cause, what
to do — on the console and in ``STORE/errors.csv``; the others are stored regardless (the readers keep library
warnings, which name no file, off the console, so a bad file prints that one line only).

Moved or renamed files: a stored volume that no manifest row names any more is an *orphan*. A manifest row whose
file has the content hash (and volume_index) of an orphan reuses the orphan's stored slices without being read
again ("moved"). After the run, orphans whose file no longer exists are dropped from the store: silently when a
manifest row took over their content (a move), else with one warning line and a count in the summary, so training
does not go on using them. Orphans whose file still exists are kept (a store may be filled from several manifests).

A failed write (full disk, quota) raises a one-line ``OutputError`` naming the store folder and about how much more
space the volumes not yet stored need; the temporary shard and index files are removed, and the store keeps its
last committed generation (every volume in it complete), so rerunning the same command continues.
"""

import fcntl

import json
import multiprocessing
import os
import shutil
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from tqdm import tqdm

from braindino.atomic import atomic_path
from braindino.errors import InputError, OutputError, write_error
from braindino.ingest.config import PreprocessConfig
from braindino.ingest.plausibility import implausible_geometry, warning_line
from braindino.ingest.readers import content_hash
from braindino.ingest.worker import ERROR_COLUMNS, VolumeFailure, error_record, prepare_volume, volume_failure
from braindino.manifest import find_duplicate_rows, read_manifest
from braindino.store.format import (DEFAULT_SHARD_BYTES, ERRORS_CSV, LOCK_FILE, PIXEL_DTYPE, RESERVED_COLUMNS,
                                    SHARDS_DIR, STORE_JSON, StoreBuilder, read_meta, volume_key)

DUPLICATE_CAUSE = "duplicate manifest row (same path and volume_index as an earlier row)"
DUPLICATE_HINT = "remove the repeated row; the first one was processed"
DROPPED_SHOWN = 3
STORED_ANYWAY = "stored anyway (prepare --strict refuses such volumes)"
STRICT_REFUSAL = "prepare without --strict stores such a volume with a warning"

_worker_moved_hashes: frozenset = frozenset()   # in a worker process: the (content_hash, volume_index) of orphans


@dataclass
class PrepareReport:
    """What one ``prepare_store`` run did. ``errors`` holds one dict per failed row (``ERROR_COLUMNS``)."""

    stored: int = 0
    skipped: int = 0
    moved: int = 0
    slices_written: int = 0
    store_slices: int = 0
    seconds: float = 0.0
    errors: list = field(default_factory=list)
    dropped: list = field(default_factory=list)   # paths of stored volumes dropped: not in the manifest, file gone
    warned: int = 0           # volumes stored with an implausible-geometry warning
    writing_slices: int = 0   # slices of the volume being added (sizes the space a failed write needed)

    @property
    def failed(self) -> int:
        return len(self.errors)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        handled = self.stored + self.skipped + self.moved + self.failed
        rate = handled / self.seconds if self.seconds > 0 else 0.0
        moved = f", {self.moved} moved" if self.moved else ""
        dropped = (f"; {len(self.dropped)} stored volumes dropped (file gone, not in the manifest)"
                   if self.dropped else "")
        warned = f", {self.warned} with warnings" if self.warned else ""
        return (f"{self.stored} volumes stored, {self.skipped} unchanged, {self.failed} failed{warned}{moved}"
                f"{dropped}; "
                f"{self.slices_written} slices written ({self.store_slices} in store); "
                f"{self.seconds:.1f} s, {rate:.2f} volumes/s")


@dataclass
class _Task:
    """One manifest row to ingest; ``stored_hash`` is the content hash of its stored copy, if any; ``strict``:
    refuse a volume with implausible geometry instead of storing it with a warning."""

    position: int
    path: str
    volume_index: int | None
    stored_hash: str | None
    config: PreprocessConfig
    strict: bool = False


@dataclass
class _Outcome:
    """A worker's answer: status "stored" (with ``columns``, [K, S, S] ``slices`` and, for an implausible volume,
    its one-line ``warning``), "unchanged", "moved" (the file's content is an orphan's; ``columns`` holds its
    ``content_hash``) or "failed"."""

    position: int
    status: str
    columns: dict = field(default_factory=dict)
    slices: np.ndarray | None = None
    z_indices: np.ndarray | None = None
    cause: str = ""
    hint: str = ""
    warning: str = ""


def _ingest(task: _Task, moved_hashes: frozenset) -> _Outcome:
    """Hash, load and preprocess one volume; never raises for a bad file. ``moved_hashes`` holds the
    (content_hash, volume_index) pairs of orphans: a file matching one is not read further ("moved")."""
    try:
        digest = content_hash(task.path)
    except Exception as err:
        failure = volume_failure(err)
        return _Outcome(task.position, "failed", cause=failure.cause, hint=failure.hint)
    if digest == task.stored_hash:
        return _Outcome(task.position, "unchanged")
    if (digest, task.volume_index) in moved_hashes:
        return _Outcome(task.position, "moved", columns={"content_hash": digest})
    result = prepare_volume(task.path, task.volume_index, task.config)
    if isinstance(result, VolumeFailure):
        return _Outcome(task.position, "failed", cause=result.cause, hint=result.hint)
    volume, prepared = result
    warnings = implausible_geometry(volume, prepared)
    if warnings and task.strict:
        return _Outcome(task.position, "failed", cause="; ".join(w.cause for w in warnings),
                        hint=f"{'; '.join(w.hint for w in warnings)}; {STRICT_REFUSAL}")
    columns = {
        "content_hash": digest,
        "spacing_x": prepared.spacing[0], "spacing_y": prepared.spacing[1], "spacing_z": prepared.spacing[2],
        "shape_x": volume.data.shape[0], "shape_y": volume.data.shape[1], "shape_z": volume.data.shape[2],
        "crop_row": prepared.crop_offset[0], "crop_col": prepared.crop_offset[1],
        "resampled_rows": prepared.resampled_shape[0], "resampled_cols": prepared.resampled_shape[1],
        "affine": json.dumps(np.asarray(prepared.affine, dtype=np.float64).tolist()),
    }
    return _Outcome(task.position, "stored", columns, prepared.slices, prepared.z_indices,
                    warning=warning_line(warnings) if warnings else "")


def _prepare_worker(moved_hashes: frozenset) -> None:
    """Worker initializer: compute on one core (torch resampling, ITK filters), so that ``workers`` processes use
    ``workers`` cores; leave Ctrl-C to the parent, which commits what is done and stops the pool."""
    global _worker_moved_hashes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    _worker_moved_hashes = moved_hashes


def _ingest_in_worker(task: _Task) -> _Outcome:
    return _ingest(task, _worker_moved_hashes)


def _outcomes(tasks: list[_Task], workers: int, moved_hashes: frozenset):
    """Yield one outcome per task, in task order; ``workers`` > 1 spreads the work over worker processes
    (``moved_hashes`` is sent to each worker once, not with every task).

    A worker that dies (killed for memory, say) raises ``BrokenProcessPool`` here rather than hanging the run.
    """
    if workers <= 1:
        yield from (_ingest(task, moved_hashes) for task in tasks)
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_prepare_worker,
                                   initargs=(moved_hashes,))
    try:
        yield from executor.map(_ingest_in_worker, tasks)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _report_failure(report: PrepareReport, row: dict, cause: str, hint: str, print_line) -> None:
    """Record one failed manifest row in ``report.errors`` and print its one-line explanation."""
    report.errors.append(error_record(row, VolumeFailure(cause, hint)))
    print_line(f"{row['path']}: {cause} — {hint}")


def _orphans_by_content(builder: StoreBuilder, manifest_keys: set) -> dict[tuple, list]:
    """{(content_hash, volume_index): [keys]} of the stored volumes that no manifest row names (orphans)."""
    orphans: dict[tuple, list] = {}
    for key, digest in builder.stored_hashes().items():
        if key not in manifest_keys:
            orphans.setdefault((digest, key[1]), []).append(key)
    return orphans


def _drop_orphans(builder: StoreBuilder, orphans: dict[tuple, list], taken_over: set, report: PrepareReport,
                  print_line) -> None:
    """Drop the orphans whose file is gone; those whose (content_hash, volume_index) is not in ``taken_over`` by
    a manifest row are recorded in ``report.dropped`` and named in one warning line."""
    for content, keys in orphans.items():
        for key in keys:
            if not os.path.exists(key[0]):
                builder.drop_volume(key)
                if content not in taken_over:
                    report.dropped.append(key[0])
    if report.dropped:
        shown = ", ".join(report.dropped[:DROPPED_SHOWN])
        more = f" and {len(report.dropped) - DROPPED_SHOWN} more" if len(report.dropped) > DROPPED_SHOWN else ""
        print_line(f"warning: {len(report.dropped)} stored volumes are no longer in the manifest and their files "
                   f"are gone ({shown}{more}); dropped from the store — list their new paths in the manifest to "
                   f"store them again")


def _write_errors(out_dir, errors: list[dict]) -> None:
    with atomic_path(out_dir / ERRORS_CSV) as tmp:
        pd.DataFrame(errors, columns=ERROR_COLUMNS).to_csv(tmp, index=False)


def _remove_temporary_files(out_dir: Path) -> None:
    """After a failed write: delete the ``*.tmp`` shard and index a writer left, unless another writer holds
    the store (it cleans up by itself when it opens)."""
    try:
        with open(out_dir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for path in [*(out_dir / SHARDS_DIR).glob("*.tmp"), *out_dir.glob("index-*.tmp")]:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    except OSError:
        pass


def _committed_volumes(out_dir: Path) -> int:
    try:
        return int(read_meta(out_dir)["n_volumes"])
    except (InputError, OSError, KeyError, ValueError):
        return 0


def prepare_store(manifest_path, out_dir, config: PreprocessConfig | None = None, workers: int = 1,
                  shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, strict: bool = False
                  ) -> PrepareReport:
    """Ingest the volumes listed in ``manifest_path`` into the store folder ``out_dir``.

    Manifest-level problems (unreadable CSV, missing columns, a column name the store reserves) and a store
    that cannot be appended to (other preprocessing config, unknown format version, another writer running)
    raise InputError before anything is written. Per-volume problems are collected in the returned report,
    printed and written to ``out_dir/errors.csv``. A volume with implausible geometry
    (:mod:`braindino.ingest.plausibility`) is stored with one ``warning:`` line, or with ``strict`` refused like a
    bad file. Moved files and stored volumes whose files are gone are handled as the module docstring says.
    """
    started = time.perf_counter()
    config = config or PreprocessConfig()
    manifest = read_manifest(manifest_path)
    reserved = sorted(RESERVED_COLUMNS.intersection(manifest.columns) - {"path", "volume_index"})
    if reserved:
        raise InputError(manifest_path, f"manifest column(s) {', '.join(reserved)} clash with store columns",
                         "rename those label columns")
    out_dir = Path(out_dir)
    rows = manifest.to_dict("records")
    duplicates = set(find_duplicate_rows(manifest))
    report = PrepareReport()
    committed_before = _committed_volumes(out_dir)
    try:
        _build(out_dir, rows, duplicates, config, workers, shard_bytes, progress, strict, report)
    except OSError as err:
        _remove_temporary_files(out_dir)
        committed = _committed_volumes(out_dir)
        to_go = max(1, len(rows) - report.skipped - report.moved - report.failed - (committed - committed_before))
        slice_bytes = config.size * config.size * PIXEL_DTYPE.itemsize
        per_volume = report.slices_written / report.stored if report.stored else report.writing_slices
        kept = (f"{to_go} volumes still to store; " + (
            f"the {committed} volumes committed before are kept and the rerun continues from them" if committed
            else "nothing was stored yet"))
        cause = err.__cause__ if isinstance(err, OutputError) and err.__cause__ is not None else err
        raise write_error(cause, out_dir, "the slice store", int(to_go * per_volume * slice_bytes) or None,
                          kept) from err
    finally:
        report.seconds = time.perf_counter() - started
    return report


def _build(out_dir: Path, rows: list, duplicates: set, config: PreprocessConfig, workers: int, shard_bytes: int,
           progress: bool, strict: bool, report: PrepareReport) -> None:
    with StoreBuilder(out_dir, config.to_dict(), config.size, config.size, shard_bytes) as builder:
        orphans = _orphans_by_content(builder, {volume_key(row["path"], row.get("volume_index")) for row in rows})
        taken_over: set = set()
        tasks = []
        for position, row in enumerate(rows):
            if position in duplicates:
                _report_failure(report, row, DUPLICATE_CAUSE, DUPLICATE_HINT, tqdm.write)
            else:
                key = volume_key(row["path"], row.get("volume_index"))
                tasks.append(_Task(position, key[0], key[1], builder.stored_hash(key), config, strict))
        outcomes = _outcomes(tasks, workers, frozenset(orphans))
        try:
            bar = tqdm(outcomes, total=len(tasks), desc="prepare", unit="vol", disable=not progress)
            for outcome in bar:
                row = rows[outcome.position]
                key = volume_key(row["path"], row.get("volume_index"))
                metadata = {name: value for name, value in row.items() if name not in ("path", "volume_index")}
                if outcome.status == "unchanged":
                    builder.update_volume(key, metadata)
                    report.skipped += 1
                elif outcome.status == "moved":
                    content = (outcome.columns["content_hash"], key[1])
                    builder.copy_volume(orphans[content][0], {"path": key[0], "volume_index": key[1], **metadata})
                    taken_over.add(content)
                    report.moved += 1
                elif outcome.status == "failed":
                    builder.drop_volume(key)
                    _report_failure(report, row, outcome.cause, outcome.hint, bar.write)
                else:
                    if outcome.warning:
                        bar.write(f"warning: {row['path']}: {outcome.warning}; {STORED_ANYWAY}")
                        report.warned += 1
                    report.writing_slices = len(outcome.slices)
                    builder.add_volume({"path": key[0], "volume_index": key[1], **metadata, **outcome.columns},
                                       outcome.slices, outcome.z_indices)
                    report.stored += 1
                    report.slices_written += len(outcome.slices)
            _drop_orphans(builder, orphans, taken_over, report, bar.write)
            builder.commit()
            report.store_slices = builder.n_slices
        finally:
            outcomes.close()
            _write_errors(out_dir, report.errors)
