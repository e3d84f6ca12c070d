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


def score_endpoints(manifest, tables, encoders: list[EncoderUnderTest], settings, seeds, folds: int,
                    explicit_shots: bool, n_bootstrap: int, workers: int, run_dir: Path, command: str,
                    started: float, failed: int):
    """Every endpoint × encoder × setting × seed → the run's :class:`~braindino.probe.results.ProbeResults`
    (also written as metrics.json, predictions.csv and report.md under ``run_dir``)."""
    from tqdm import tqdm

    from braindino.probe.endpoints import restrict
    from braindino.probe.evaluate import evaluate_endpoint, plan_endpoint
    from braindino.probe.inputs import SubjectBags
    from braindino.probe.outputs import (headline_lines, prediction_rows, write_attention, write_metrics,
                                         write_predictions)
    from braindino.probe.report import write_report
    from braindino.probe.results import EncoderInfo, ProbeResults
    from braindino.probe.segmentation import evaluate_segmentation

    where = manifest.attrs["manifest_path"]
    embedded = set.intersection(*(set(e.rows) for e in encoders))
    tables = [restrict(table, embedded, "not embedded") for table in tables]
    plans = [plan_endpoint(table, settings, seeds, folds, explicit_shots, where) for table in tables]
    total = sum(len(encoders) * len(plan.settings) * len(seeds) for plan in plans)
    bar = tqdm(total=total, desc="probe", unit="fit", file=sys.stderr)
    endpoints, rows, lines = [], [], []
    for table, plan in zip(tables, plans):
        spec = table.spec
        if spec.task == "segmentation":
            result, cells = evaluate_segmentation(table, plan, _segmentation_inputs(table, encoders), seeds,
                                                  n_bootstrap, CONFIDENCE, run_dir, bar)
        else:
            inputs, slices = [], []
            for entry in encoders:
                bags = SubjectBags(table, entry.features, entry.rows)
                if spec.pooling == "mil":
                    encoder_inputs, encoder_slices = bags.mil(spec.fusion, where)
                    slices.append(encoder_slices)
                else:
                    encoder_inputs = bags.pooled(spec.pooling, spec.fusion)
                inputs.append(dict(name=entry.name, parameters=entry.parameters, inputs=encoder_inputs))
            result, cells = evaluate_endpoint(table, plan, inputs, seeds, n_bootstrap, CONFIDENCE, max(1, workers),
                                              bar)
            for cell in cells:
                if "attention" in cell:
                    write_attention(run_dir / "attention" / f"{spec.name}.csv", table, cell, slices[0])
        endpoints.append(result)
        rows += prediction_rows(table, cells)
        lines += headline_lines(result, seeds)
    bar.close()
    results = ProbeResults(
        run_dir=str(run_dir.resolve()), command=command, model=encoders[0].name, seeds=list(seeds),
        n_bootstrap=n_bootstrap, confidence=CONFIDENCE, predictions="predictions.csv",
        elapsed_s=round(perf_counter() - started, 2),
        encoders=[EncoderInfo(e.name, e.role, e.spec, e.fingerprint, e.parameters,
                              str(Path(e.features.root).resolve())) for e in encoders],
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
