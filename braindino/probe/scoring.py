"""Score a probe run's endpoints with every encoder and write the run's files.

Given the endpoint tables and the encoders with their features (:mod:`braindino.probe.encoders`), each endpoint is
planned on the subjects every encoder embedded, its heads fitted and scored per setting and seed
(:func:`~braindino.probe.evaluate.evaluate_endpoint`, or the segmentation decoder), and the run folder gets
``predictions.csv``, ``metrics.json`` and ``report.md``; the headline lines go to stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path
from time import perf_counter

from braindino.probe.encoders import EncoderUnderTest

CONFIDENCE = 0.95


def _segmentation_inputs(table, encoders: list[EncoderUnderTest]) -> list[dict]:
    """What the segmentation decoder reads per encoder: features, each subject's feature row, grid, slice size."""
    return [dict(name=e.name, slug=e.slug, parameters=e.parameters, features=e.features,
                 rows=[e.rows[next(iter(r.values()))] for r in table.rows], grid=e.features.model["grid"],
                 slice_size=e.features.model["preprocessing"]["size"]) for e in encoders]


def _is_trained(entry) -> bool:
    from braindino.probe.trained import TrainedEncoder
    return isinstance(entry, TrainedEncoder)


def _endpoint_inputs(table, entry, where) -> tuple[dict, object]:
    """What :func:`~braindino.probe.evaluate.evaluate_endpoint` reads for one encoder row, and its MIL slices
    (None unless MIL pooling of a frozen encoder)."""
    spec = table.spec
    if _is_trained(entry):
        return dict(name=entry.name, parameters=entry.frozen_parameters, inputs=entry.inputs(table),
                    factory=entry.factory()), None
    from braindino.probe.inputs import SubjectBags

    bags = SubjectBags(table, entry.features, entry.rows)
    if spec.pooling == "mil":
        encoder_inputs, encoder_slices = bags.mil(spec.fusion, where)
        return dict(name=entry.name, parameters=entry.parameters, inputs=encoder_inputs), encoder_slices
    return dict(name=entry.name, parameters=entry.parameters, inputs=bags.pooled(spec.pooling, spec.fusion)), None


def score_endpoints(manifest, tables, encoders: list, settings, seeds, folds: int,
                    explicit_shots: bool, n_bootstrap: int, workers: int, run_dir: Path, command: str,
                    started: float, failed: int):
    """Every endpoint × encoder × setting × seed → the run's :class:`~braindino.probe.results.ProbeResults`
    (also written as metrics.json, predictions.csv and report.md under ``run_dir``). ``encoders``: the
    :class:`EncoderUnderTest` rows (the model first), then any end-to-end rows
    (:class:`~braindino.probe.trained.TrainedEncoder`: not run for segmentation endpoints)."""
    from tqdm import tqdm

    from braindino.probe.compare import adjust_run
    from braindino.probe.endpoints import restrict
    from braindino.probe.evaluate import evaluate_endpoint, plan_endpoint
    from braindino.probe.outputs import (headline_lines, prediction_rows, write_attention, write_metrics,
                                         write_predictions)
    from braindino.probe.report import write_report
    from braindino.probe.results import EncoderInfo, ProbeResults
    from braindino.probe.segmentation import evaluate_segmentation

    where = manifest.attrs["manifest_path"]
    embedded = set.intersection(*(set(e.rows) for e in encoders))
    tables = [restrict(table, embedded, "not embedded") for table in tables]
    plans = [plan_endpoint(table, settings, seeds, folds, explicit_shots, where) for table in tables]
    frozen = [e for e in encoders if not _is_trained(e)]
    trained = [e for e in encoders if _is_trained(e)]

    def runs(table):
        return frozen if table.spec.task == "segmentation" else encoders

    total = sum(len(runs(table)) * len(plan.settings) * len(seeds) for table, plan in zip(tables, plans))
    bar = tqdm(total=total, desc="probe", unit="fit", file=sys.stderr)
    endpoints, rows, lines = [], [], []
    for table, plan in zip(tables, plans):
        spec = table.spec
        if spec.task == "segmentation":
            result, cells = evaluate_segmentation(table, plan, _segmentation_inputs(table, frozen), seeds,
                                                  n_bootstrap, CONFIDENCE, run_dir, bar)
            if trained:
                result.notes.append(f"{', '.join(e.name for e in trained)}: not run for segmentation (the "
                                    "end-to-end rows predict one value per sample)")
        else:
            pairs = [_endpoint_inputs(table, entry, where) for entry in encoders]
            result, cells = evaluate_endpoint(table, plan, [inputs for inputs, _ in pairs], seeds, n_bootstrap,
                                              CONFIDENCE, max(1, workers), bar)
            if trained:
                from braindino.probe.trained import training_note
                result.notes += [entry.note() for entry in trained] + [training_note(trained)]
            for cell in cells:
                if "attention" in cell:
                    write_attention(run_dir / "attention" / f"{spec.name}.csv", table, cell, pairs[0][1])
        endpoints.append(result)
        rows += prediction_rows(table, cells)
    adjust_run(endpoints)
    for result in endpoints:
        lines += headline_lines(result, seeds)
    bar.close()
    results = ProbeResults(
        run_dir=str(run_dir.resolve()), command=command, model=encoders[0].name, seeds=list(seeds),
        n_bootstrap=n_bootstrap, confidence=CONFIDENCE, predictions="predictions.csv",
        elapsed_s=round(perf_counter() - started, 2),
        encoders=[EncoderInfo(e.name, e.role, e.spec, e.fingerprint, e.parameters,
                              "" if e.features is None else str(Path(e.features.root).resolve())) for e in encoders],
        endpoints=endpoints)
    write_predictions(run_dir / "predictions.csv", rows)
    write_metrics(run_dir / "metrics.json", results)
    write_report(run_dir, results)
    for line in lines:
        print(line)
    for endpoint in endpoints:
        for note in endpoint.notes:
            print(f"note: {endpoint.name}: {note}")
    missing = f"; {failed} volume(s) could not be embedded (see {run_dir}/features/*/errors.csv)" if failed else ""
    print(f"probe: {len(endpoints)} endpoint(s) × {len(encoders)} encoder(s), {total} fits in "
          f"{perf_counter() - started:.1f}s -> {run_dir}/metrics.json, predictions.csv, report.md{missing}")
    return results
