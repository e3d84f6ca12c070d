"""``run_robustness``: do an encoder's probe predictions survive what another scanner does to the images? The
Python API behind ``braindino robustness``.

Heads are trained on clean training volumes exactly as ``run_probe`` trains them (the same endpoint table,
protocol, folds and head code — :mod:`braindino.probe.run`'s pieces — at the 100 % setting), then score the test
volumes perturbed at each severity of a grid (:mod:`.perturbations`, applied to the volume before ingestion), for
every encoder compared: the model, and by default a random init of its architecture and the pixel baseline.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import numpy as np

from braindino.errors import InputError

TASKS = ("classification", "regression", "survival")
CONFIDENCE = 0.95


@dataclass
class RobustnessRun:
    """What :func:`run_robustness` wrote and scored: ``rows`` (one dict per encoder × perturbation × severity, the
    rows of ``robustness.csv``), the paths ``table`` (csv), ``markdown``, ``metrics`` (json), ``errors`` (csv) and
    ``curves`` ({perturbation: png}), and ``failed`` (failed (volume, condition) pairs and unembedded volumes)."""

    rows: list
    table: Path
    markdown: Path
    metrics: Path
    errors: Path
    curves: dict
    failed: int


def run_robustness(models, manifest, out, *, task: str, target=None, time=None, event=None, sequences=None,
                   fusion="concat", pooling="mean", head="linear", unit="auto", baselines=(), perturbations=None,
                   grid=(), perturbation_seed: int = 0, metric=None, seeds=(0,), folds: int = 5,
                   protocol: str = "auto", n_bootstrap: int = 1000, default_baselines: bool = True, workers: int = 1,
                   batch_size: int = 64, slice_stride: int = 1, device=None, features_root=None) -> RobustnessRun:
    """Score ``task``'s probe heads of every encoder on perturbed test volumes of ``manifest`` into ``out``.

    ``models``: one spec or a list (the first is the model under test, the others baselines, as ``baselines``);
    ``perturbations``: names (default all) with ``grid`` overrides ``["gibbs=0,0.2", ...]``. Clean features of all
    encoders are extracted together (each volume read once per distinct preprocessing) into
    ``features_root/<encoder>/`` (default ``out/features``), a content-keyed cache shared with probe runs.
    Raises InputError for bad input."""
    from tqdm import tqdm

    from braindino.manifest import assert_no_duplicate_rows, read_manifest
    from braindino.probe import metrics as M
    from braindino.probe.encoders import extract_features, load_encoders
    from braindino.probe.endpoints import EndpointSpec, build_table, parse_sequences, restrict
    from braindino.probe.evaluate import plan_endpoint
    from braindino.probe.fitting import select
    from braindino.probe.inputs import sample_inputs
    from braindino.probe.protocols import Setting
    from braindino.probe.run import apply_protocol, check_options
    from braindino.robustness import outputs
    from braindino.robustness.conditions import embed_condition
    from braindino.robustness.evaluate import fit_heads, predict_positions, score_condition, subset
    from braindino.robustness.perturbations import PERTURBATIONS, parse_grid

    started = perf_counter()
    run_dir = Path(out)
    models = [models] if isinstance(models, (str, Path)) else list(models)
    if task not in TASKS:
        raise InputError("--task", f"robustness scores {', '.join(TASKS)} endpoints, not {task!r}",
                         "probe segmentation with braindino probe")
    seeds = [int(s) for s in seeds] or [0]
    check_options([100.0], [], seeds, folds, slice_stride)
    chosen_grid = parse_grid(perturbations, list(grid))
    metric = metric or M.HEADLINE[task]
    if metric not in M.metric_names(task) or metric in M.NOT_BOOTSTRAPPED:
        raise InputError("--metric", f"{metric!r} is not a bootstrapped {task} metric",
                         f"choose among {', '.join(m for m in M.metric_names(task) if m not in M.NOT_BOOTSTRAPPED)}")
    table_manifest = read_manifest(manifest)
    assert_no_duplicate_rows(table_manifest)
    where = table_manifest.attrs["manifest_path"]
    name = target or task
    spec = EndpointSpec(name=name, task=task, target=target, time=time, event=event, mask=None,
                        sequences=parse_sequences(sequences), fusion=fusion, pooling=pooling, head=head, unit=unit,
                        brain_age_correction=False).check("command line")
    table = apply_protocol(build_table(table_manifest, spec), protocol, where)
    settings = [Setting("fraction", 100.0)]
    plan_endpoint(table, settings, seeds, folds, False, where)
    encoders = load_encoders(models[0], [*models[1:], *baselines], default_baselines, device)
    used_rows = sorted({row for rows in table.rows for row in rows.values()})
    used = table_manifest.loc[used_rows]
    used.attrs.update(table_manifest.attrs)

    features_root = Path(features_root) if features_root is not None else run_dir / "features"
    failed = extract_features(encoders, used, features_root, batch_size=batch_size, workers=workers,
                              slice_stride=slice_stride, stage="robustness")
    embedded = set.intersection(*(set(e.rows) for e in encoders))
    table = restrict(table, embedded, "not embedded")
    plan = plan_endpoint(table, settings, seeds, folds, False, where)
    clean_inputs = {e.name: sample_inputs(table, e.features, e.rows, where) for e in encoders}
    fitted = fit_heads(table, plan, clean_inputs, seeds)

    test_positions = np.unique(np.concatenate([fold.test for fold in plan.folds[seeds[0]]]))
    test_rows = sorted({row for p in test_positions for row in table.rows[p].values()})
    clean_preds = {(e.name, seed): predict_positions(table, fitted, e.name, seed, clean_inputs[e.name],
                                                         select(clean_inputs[e.name], test_positions),
                                                         test_positions)
                   for e in encoders for seed in seeds}
    rows, errors = [], []
    conditions = [(p, s) for p, severities in chosen_grid.items() for s in severities]
    bar = tqdm(total=len(conditions), desc="robustness", unit="condition", file=sys.stderr)
    for perturbation, severity in conditions:
        spec_p = PERTURBATIONS[perturbation]
        if severity == spec_p.identity:
            positions, condition_preds = test_positions, dict(clean_preds)
        else:
            features, condition_errors = embed_condition(encoders, table_manifest, test_rows, perturbation, severity,
                                                         perturbation_seed, slice_stride, workers, batch_size)
            for error in condition_errors:
                bar.write(f"error: {error['path']}: {error['cause']} — {error['hint']} "
                          f"({perturbation}={severity:g})", file=sys.stderr)
                errors.append({"path": error["path"], "perturbation": perturbation, "severity": severity,
                               "cause": error["cause"], "hint": error["hint"]})
            available = set.intersection(*(set(f.arrays) for f in features.values()))
            keep = np.array([set(r.values()) <= available for r in table.rows], dtype=bool)
            positions = np.flatnonzero(keep)
            condition_table = restrict(table, available, "perturbation failed")
            condition_preds = {}
            for e in encoders:
                inputs = sample_inputs(condition_table, features[e.name], {r: r for r in available}, where)
                for seed in seeds:
                    condition_preds[(e.name, seed)] = predict_positions(
                        table, fitted, e.name, seed, clean_inputs[e.name], inputs, positions)
        if len(positions):
            index = np.searchsorted(test_positions, positions)
            for e in encoders:
                scores = score_condition(task, metric, [condition_preds[(e.name, s)] for s in seeds],
                                         [subset(clean_preds[(e.name, s)], index) for s in seeds],
                                         table.subjects[positions], n_bootstrap, CONFIDENCE)
                rows.append({"encoder": e.name, "perturbation": perturbation, "parameter": spec_p.parameter,
                             "severity": float(severity), "metric": metric, **scores})
        bar.update(1)
    bar.close()
    failed += len(errors)

    header = {"endpoint": name, "task": task, "target": target, "time": time, "event": event, "metric": metric,
              "higher_is_better": metric not in M.LOWER_IS_BETTER, "pooling": pooling,
              "head": "attention-mil" if pooling == "mil" else head, "fusion": fusion,
              "protocol": "cv" if table.split is None else "split", "folds": len(plan.folds[seeds[0]]),
              "seeds": seeds, "n_bootstrap": n_bootstrap, "confidence": CONFIDENCE,
              "perturbation_seed": perturbation_seed, "n_subjects": table.n_subjects,
              "n_test_samples": int(len(test_positions)),
              "encoders": [{"name": e.name, "spec": e.spec, "fingerprint": e.fingerprint,
                            "parameters": e.parameters} for e in encoders],
              "perturbations": {p: {"parameter": PERTURBATIONS[p].parameter, "identity": PERTURBATIONS[p].identity,
                                    "severities": list(v), "description": PERTURBATIONS[p].description}
                                for p, v in chosen_grid.items()},
              "elapsed_s": round(perf_counter() - started, 2)}
    curves = {p: outputs.curve_figure(run_dir / "figures" / f"robustness_{p}.png", rows, p, metric)
              for p in chosen_grid}
    done = RobustnessRun(rows, table=outputs.write_table(run_dir / "robustness.csv", rows),
                         markdown=outputs.write_markdown(run_dir / "robustness.md", rows, header, curves),
                         metrics=outputs.write_metrics_json(run_dir / "metrics.json", header, rows, errors),
                         errors=outputs.write_errors(run_dir / "errors.csv", errors), curves=curves, failed=failed)
    worst = outputs.worst_drops(rows)
    for e in encoders:
        print(outputs.console_line(e.name, worst.get(e.name), metric))
    print(f"robustness: {len(conditions)} conditions × {len(encoders)} encoders on {len(test_positions)} test "
          f"samples in {perf_counter() - started:.1f}s -> {run_dir}/robustness.csv, "
          f"robustness.md, metrics.json, figures/" + (f"; {failed} failure(s), see errors.csv" if failed else ""))
    return done
