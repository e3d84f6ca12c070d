"""``run_probe``: does a frozen encoder predict my endpoint? The Python API behind ``braindino probe``.

Metrics with CIs, the same splits for the model and its baselines, paired tests; the run folder gets
``metrics.json``, ``predictions.csv``, ``report.md`` (+ html, figures), ``features/<encoder>/`` and, for
segmentation, ``masks/``. Its pieces are public for the stages that build on a probe (robustness, saliency):
:func:`check_options`, :func:`endpoint_specs`, :func:`endpoint_tables`, :func:`apply_protocol` and
:mod:`braindino.probe.encoders`.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

from braindino.errors import InputError
from braindino.probe.encoders import EncoderUnderTest, extract_features, load_encoders
from braindino.probe.endpoints import EndpointSpec, endpoints_from_yaml, parse_sequences

DEFAULT_WORKERS = min(4, len(os.sched_getaffinity(0)))


@dataclass
class ProbeRun:
    """What :func:`run_probe` did: ``results`` (the :class:`~braindino.probe.results.ProbeResults` tree that
    ``metrics.json`` holds), ``failed`` ((encoder, volume) pairs that could not be embedded; their subjects are left
    out) and the run folder ``run_dir``."""

    results: object
    failed: int
    run_dir: Path

    @property
    def report(self) -> Path:
        return self.run_dir / "report.md"


def check_options(fractions, shots, seeds, folds: int, slice_stride: int = 1) -> None:
    """Raise InputError for settings no probe can run (fractions outside (0, 100], shots < 1, no seed, < 2 folds,
    a slice stride below 1)."""
    if any(not 0 < f <= 100 for f in fractions):
        raise InputError("--fractions", "fractions must be in (0, 100] percent", "write e.g. --fractions 10,100")
    if any(k < 1 for k in shots):
        raise InputError("--shots", "shots must be at least 1 per class", "write e.g. --shots 1,5")
    if not seeds or not fractions and not shots:
        raise InputError("--seeds/--fractions", "nothing to run", "give at least one seed and one fraction")
    if folds < 2:
        raise InputError("--folds", "cross-validation needs at least 2 folds", "pass --folds 5")
    if slice_stride < 1:
        raise InputError("--slice-stride", f"must be at least 1, got {slice_stride}", "pass --slice-stride 1")


def endpoint_specs(endpoints=None, task=None, target=None, time=None, event=None, mask=None, sequences=None,
                   fusion="concat", pooling="mean", head="linear", unit="auto",
                   brain_age_correction=False) -> list[EndpointSpec]:
    """The endpoints of a run: ``endpoints`` (a YAML file, or a list of EndpointSpec) with the other arguments as
    defaults, or the one endpoint those arguments describe."""
    defaults = dict(task=task, target=target, time=time, event=event, mask=mask, sequences=sequences,
                    fusion=fusion, pooling=pooling, head=head, unit=unit, brain_age_correction=brain_age_correction)
    if isinstance(endpoints, (list, tuple)):
        return [spec.check("endpoints") for spec in endpoints]
    if endpoints:
        return endpoints_from_yaml(endpoints, defaults)
    if not task:
        raise InputError("command line", "no --task given", "pass --task and --target, or --endpoints FILE.yaml")
    if task == "segmentation" and not mask:
        defaults["mask"] = "mask"
    name = target or defaults["mask"] or task
    return [EndpointSpec(name=name, **{**defaults, "sequences": parse_sequences(sequences)}).check("command line")]


def apply_protocol(table, protocol: str, where):
    """``protocol`` "cv" drops the table's split (cross-validation over every subject); "split" requires one;
    "auto" keeps the table as built."""
    if protocol == "cv":
        table.split = None
    elif protocol == "split" and table.split is None:
        raise InputError(where, f"endpoint {table.spec.name!r}: --protocol split needs a train/val/test split for "
                                "every subject", "fill in the split column, or use --protocol cv")
    return table


UNLABELLED_SHOWN = 5


def _print_unlabelled(table) -> None:
    """One console line: how many rows of which subjects the endpoint dropped for an empty or missing label."""
    names = table.unlabelled_subjects
    shown = ", ".join(names[:UNLABELLED_SHOWN]) + (f" and {len(names) - UNLABELLED_SHOWN} more"
                                                  if len(names) > UNLABELLED_SHOWN else "")
    print(f"probe: endpoint {table.spec.name!r}: {table.dropped.get('empty label', 0)} rows without a label "
          f"(empty, n/a, NA, ...) dropped, of {len(names)} subjects: {shown}", file=sys.stderr)


def endpoint_tables(manifest, specs, protocol, settings, seeds, folds, explicit_shots, skip_infeasible=False):
    """One SubjectTable per endpoint this cohort can support (``skip_infeasible``: the others skipped with one
    line each, else the first raises); masks of segmentation endpoints must be on their image's grid."""
    from braindino.probe.endpoints import build_table, mask_grid_mismatch
    from braindino.probe.evaluate import plan_endpoint

    where = manifest.attrs["manifest_path"]
    tables = []
    for spec in specs:
        try:
            table = apply_protocol(build_table(manifest, spec), protocol, where)
            plan_endpoint(table, settings, seeds, folds, explicit_shots, where)
        except InputError as err:
            if not skip_infeasible:
                raise
            print(f"probe: endpoint {spec.name!r} skipped: {err.cause} — {err.hint}", file=sys.stderr)
            continue
        if table.unlabelled_subjects:
            _print_unlabelled(table)
        tables.append(table)
    if not tables:
        raise InputError(where, "no endpoint can be probed on this cohort", "label more subjects")
    for table in tables:
        if table.spec.task == "segmentation":
            for rows, mask in zip(table.rows, table.y["mask"]):
                problem = mask_grid_mismatch(manifest.at[next(iter(rows.values())), "path"], mask)
                if problem:
                    raise InputError(mask, problem, "the mask must be on its image's voxel grid (same shape and "
                                                    "affine); resample it with nearest-neighbour first")
    return tables


def run_probe(model, manifest, out, *, endpoints=None, task=None, target=None, time=None, event=None, mask=None,
              sequences=None, fusion="concat", pooling="mean", head="linear", unit="auto",
              brain_age_correction=False, baselines=(), default_baselines=True, fractions=(1, 10, 25, 50, 100),
              shots=None, seeds=(0, 1, 2), folds=5, protocol="auto", n_bootstrap=1000, features=None,
              skip_infeasible=False, workers=DEFAULT_WORKERS, batch_size=64, slice_stride=1, device=None,
              finetune=(), epochs=30, max_slices=16, scratch_size=64, command=None) -> ProbeRun:
    """Probe ``model`` (a :func:`~braindino.load_encoder` spec) against its baselines on ``manifest``'s endpoints
    into the run folder ``out``.

    Endpoints: ``endpoints`` (YAML file or [EndpointSpec]) or one from ``task``/``target``/``time``/``event``/
    ``mask`` and the pooling arguments. ``fractions`` in percent, ``shots`` per class (None: 1 and 5 where every
    class has enough subjects), ``protocol`` "auto" | "split" | "cv". ``features``: an existing features folder of
    the model; the other encoders are extracted into ``out/features/<encoder>/`` (reused on a rerun).

    End-to-end rows (:mod:`braindino.probe.trained`), trained per training set on the same splits: ``"scratch"``
    among ``baselines`` (a small CNN from random init), each ``finetune`` spec (``"last:K"``, ``"lora:R"``: the
    model fine-tuned); ``epochs`` (at most, early-stopped), ``max_slices`` per volume, ``scratch_size`` (px).
    ``command``: what the run records as its command line. Raises InputError for bad input (nothing written)."""
    from braindino.manifest import assert_no_duplicate_rows, read_manifest
    from braindino.probe.protocols import parse_settings
    from braindino.probe.scoring import score_endpoints
    from braindino.probe.trained import SCRATCH, SliceCollector, TrainingOptions, parse_finetune, trained_encoders

    started = perf_counter()
    run_dir = Path(out)
    fractions, seeds = [float(f) for f in fractions], [int(s) for s in seeds]
    explicit_shots = shots is not None
    shots = [int(k) for k in (shots if explicit_shots else (1, 5))]
    check_options(fractions, shots, seeds, folds, slice_stride)
    baselines = [str(b) for b in baselines]
    scratch, baselines = SCRATCH in baselines, [b for b in baselines if b != SCRATCH]
    finetune = [str(f) for f in (finetune or ())]
    for spec in finetune:
        parse_finetune(spec)
    options = TrainingOptions(int(epochs), int(max_slices), int(scratch_size),
                              device=_training_device(device)).check()
    settings = parse_settings(fractions, shots)
    table_manifest = read_manifest(manifest)
    assert_no_duplicate_rows(table_manifest)
    specs = endpoint_specs(endpoints, task, target, time, event, mask, sequences, fusion, pooling, head, unit,
                           brain_age_correction)
    tables = endpoint_tables(table_manifest, specs, protocol, settings, seeds, folds, explicit_shots,
                             skip_infeasible)
    encoders = load_encoders(model, baselines, default_baselines, device)
    used_rows = sorted({row for table in tables for rows in table.rows for row in rows.values()})
    used = table_manifest.loc[used_rows]
    used.attrs.update(table_manifest.attrs)
    patch_tokens = any(t.spec.task == "segmentation" for t in tables)
    if patch_tokens and slice_stride != 1:
        raise InputError("--slice-stride", "segmentation predicts every slice of a volume",
                         "pass --slice-stride 1 (or probe the segmentation endpoint in its own run)")
    preprocessing = encoders[0].encoder.preprocessing
    trained = trained_encoders(encoders[0], scratch, finetune, options, slice_stride)
    if trained and all(t.spec.task == "segmentation" for t in tables):
        print("probe: --baseline scratch / --finetune skipped: segmentation endpoints only", file=sys.stderr)
        trained = []
    collector = SliceCollector(trained, options.max_slices)
    failed = extract_features(encoders, used, run_dir / "features", features, batch_size, workers, patch_tokens,
                              slice_stride, tap=(preprocessing, collector) if trained else None)
    failed += collector.read_missing(used, preprocessing, slice_stride, workers)
    encoders += trained
    for entry in encoders:
        entry.release()
    results = score_endpoints(table_manifest, tables, encoders, settings, seeds, folds, explicit_shots, n_bootstrap,
                              workers, run_dir, command or shlex.join(["probe.py", *sys.argv[1:]]), started,
                              failed)
    return ProbeRun(results, failed, run_dir)


def _training_device(device) -> str:
    """Where the end-to-end rows train: the run's ``device`` when given, else cuda when there is one, else cpu."""
    if device is not None:
        return str(device)
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = ["EncoderUnderTest", "ProbeRun", "apply_protocol", "check_options", "endpoint_specs", "endpoint_tables",
           "load_encoders", "run_probe"]
