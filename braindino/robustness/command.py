"""``braindino robustness``: do an encoder's probe predictions survive what another scanner does to the images?

Heads are trained on clean training volumes exactly as ``braindino probe`` trains them (same endpoint table,
protocol, folds and head code, the 100 % setting), then score the test volumes perturbed at each severity of a
grid (:mod:`.perturbations`, applied to the volume before ingestion), for every encoder compared: the ``--model``
(s), and by default a random init of the first model's architecture and the pixel baseline.

Exit status: 0 when every condition was scored on every test volume; 1 when some volumes could not be embedded or
perturbed (one ``error:`` line each, ``RUN/errors.csv``; the rest is scored without them); 2 when nothing was done
(bad manifest, labels, options or model: one ``error:`` line); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from argparse import Namespace
from pathlib import Path
from time import perf_counter

import numpy as np

from braindino.errors import InputError

TASKS = ("classification", "regression", "survival")
CONFIDENCE = 0.95


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from braindino.probe.endpoints import FUSIONS, HEADS, POOLINGS, UNITS
    from braindino.robustness.perturbations import PERTURBATION_ORDER, PERTURBATIONS

    grids = "; ".join(f"{name} ({p.parameter}: {', '.join(f'{v:g}' for v in p.severities)})"
                      for name, p in PERTURBATIONS.items())
    parser.add_argument("--model", action="append", required=True, metavar="MODEL",
                        help="encoder to compare (model folder, random:<arch>, pixels[:grid], timm local-dir "
                             "folder); repeatable, the first is the model under test")
    parser.add_argument("--no-default-baselines", action="store_true",
                        help="do not add a random init of the first model's architecture and the pixel baseline")
    parser.add_argument("--manifest", required=True, metavar="CSV", help="manifest: path, subject, optional "
                        "sequence, split (train/val → training, test → scored; else subject-grouped CV), labels")
    parser.add_argument("--task", required=True, choices=TASKS, help="what the endpoint is")
    parser.add_argument("--target", metavar="COL", help="label column (classification / regression)")
    parser.add_argument("--time", metavar="COL", help="survival: time-to-event column")
    parser.add_argument("--event", metavar="COL", help="survival: event column (1 event, 0 censored)")
    parser.add_argument("--sequences", metavar="LIST", help="comma-separated sequences fused per subject "
                        "(default: all)")
    parser.add_argument("--fusion", choices=FUSIONS, default="concat", help="sequence fusion (as probe)")
    parser.add_argument("--pooling", choices=POOLINGS, default="mean", help="slice pooling (as probe; mil = "
                        "attention-MIL head)")
    parser.add_argument("--head", choices=HEADS, default="linear", help="head on pooled features (as probe)")
    parser.add_argument("--unit", choices=UNITS, default="auto", help="sample unit (as probe)")
    parser.add_argument("--perturbations", metavar="LIST", help=f"comma-separated, default all: {grids}")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                        help="replace a perturbation's severities, e.g. gibbs=0,0.2,0.4 (repeatable; the clean "
                             "severity is always added)")
    parser.add_argument("--perturbation-seed", type=int, default=0,
                        help="seed of the random parts of the perturbations (noise, bias-field shape); default 0")
    parser.add_argument("--metric", help="metric to report (default: the task's headline metric)")
    parser.add_argument("--seeds", default="0", metavar="LIST", help="head seeds (default 0)")
    parser.add_argument("--folds", type=int, default=5, help="CV folds when there is no split (default 5)")
    parser.add_argument("--protocol", choices=("auto", "split", "cv"), default="auto",
                        help="as probe: split (train on train+val, score test), cv, or auto")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="subject bootstrap resamples "
                        "for CIs (default 1000)")
    parser.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))), metavar="N",
                        help="processes reading and perturbing volumes (default: up to 4 cores)")
    parser.add_argument("--batch-size", type=int, default=64, help="slices per encoder batch (default 64)")
    parser.add_argument("--slice-stride", type=int, default=1, metavar="K", help="embed every K-th kept slice")
    parser.add_argument("--device", default=None, help="encoder device (default cuda > mps > cpu)")
    parser.add_argument("--features", metavar="DIR", help="folder of clean feature folders, one per encoder "
                        "(DIR/<encoder>/, e.g. a probe run's RUN/features): volumes already there with the same "
                        "settings are reused, the others added (default: RUN/features)")
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder: robustness.csv, robustness.md, "
                        "metrics.json, figures/, features/, errors.csv")
    parser.epilog = f"perturbations: {', '.join(PERTURBATION_ORDER)}"


def run(args: argparse.Namespace) -> int:
    from braindino.probe.command import _numbers

    try:
        seeds = _numbers(args.seeds, "seeds", int)
        names = [n.strip() for n in args.perturbations.split(",") if n.strip()] if args.perturbations else None
        _paths, failed = robustness(
            args.model, args.manifest, args.out, args.task, target=args.target, time=args.time, event=args.event,
            sequences=args.sequences, fusion=args.fusion, pooling=args.pooling, head=args.head, unit=args.unit,
            perturbations=names, grid=args.grid, perturbation_seed=args.perturbation_seed, metric=args.metric,
            seeds=seeds, folds=args.folds, protocol=args.protocol, n_bootstrap=args.bootstrap,
            default_baselines=not args.no_default_baselines, workers=args.workers, batch_size=args.batch_size,
            slice_stride=args.slice_stride, device=args.device, features_dir=args.features)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted — clean features so far are kept in {args.out}/features", file=sys.stderr)
        return 130
    return 1 if failed else 0


def run_robustness(models, manifest, out, task: str, target: str | None = None, **options) -> dict:
    """Python entry point of ``braindino robustness``; ``models``: one spec or a list (the first is the model under
    test); ``options``: the keyword arguments of :func:`robustness`. Returns the paths written: {"table",
    "markdown", "metrics", "errors": Path, "curves": {perturbation: Path}}. Raises InputError for bad input."""
    paths, _failed = robustness([models] if isinstance(models, (str, os.PathLike)) else list(models), manifest,
                                out, task, target=target, **options)
    return paths


def robustness(models: list, manifest, out, task: str, target=None, time=None, event=None, sequences=None,
               fusion="concat", pooling="mean", head="linear", unit="auto", perturbations=None, grid=(),
               perturbation_seed: int = 0, metric=None, seeds=(0,), folds: int = 5, protocol: str = "auto",
               n_bootstrap: int = 1000, default_baselines: bool = True, workers: int = 1, batch_size: int = 64,
               slice_stride: int = 1, device=None, features_dir=None) -> tuple[dict, int]:
    """The whole run → (paths written, number of failed (volume, condition) pairs and unembedded volumes).

    Clean features of all encoders are extracted together (each volume read once per distinct preprocessing) into
    ``features_dir/<encoder>/`` (default ``out/features``), a content-keyed cache shared with probe runs."""
    from tqdm import tqdm

    from braindino.manifest import assert_no_duplicate_rows, read_manifest
    from braindino.probe import metrics as M
    from braindino.probe.endpoints import EndpointSpec, build_table, parse_sequences, restrict
    from braindino.probe.evaluate import plan_endpoint
    from braindino.probe.protocols import Setting
    from braindino.robustness import outputs
    from braindino.robustness.conditions import embed_condition
    from braindino.robustness.evaluate import fit_heads, predict_positions, sample_inputs, score_condition, subset
    from braindino.robustness.perturbations import PERTURBATIONS, parse_grid

    started = perf_counter()
    run_dir = Path(out)
    if task not in TASKS:
        raise InputError("--task", f"robustness scores {', '.join(TASKS)} endpoints, not {task!r}",
                         "probe segmentation with braindino probe")
    seeds = list(seeds) or [0]
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
    from braindino.probe.command import apply_protocol, load_encoders

    table = apply_protocol(build_table(table_manifest, spec), protocol, where)
    settings = [Setting("fraction", 100.0)]
    plan_endpoint(table, settings, seeds, folds, False, where)
    encoders = load_encoders(Namespace(model=str(models[0]), baseline=[str(m) for m in models[1:]],
                                       no_default_baselines=not default_baselines, device=device))
    used_rows = sorted({row for rows in table.rows for row in rows.values()})
    used = table_manifest.loc[used_rows]
    used.attrs.update(table_manifest.attrs)

    from braindino.extract.cohort import extract_cohorts
    from braindino.probe.inputs import feature_rows

    features_root = Path(features_dir) if features_dir is not None else run_dir / "features"
    folders = [features_root / entry["slug"] for entry in encoders]
    print(f"robustness: clean features of {', '.join(e['name'] for e in encoders)} -> {features_root}",
          file=sys.stderr)
    extracted = extract_cohorts([(entry["encoder"], folder) for entry, folder in zip(encoders, folders)], used,
                                batch_size=batch_size, workers=workers, slice_stride=slice_stride)
    failed = 0
    for entry, (features, _report) in zip(encoders, extracted):
        entry["features"] = features
        entry["rows"] = feature_rows(features, used)
        failed += len(used) - len(entry["rows"])
    embedded = set.intersection(*(set(e["rows"]) for e in encoders))
    table = restrict(table, embedded, "not embedded")
    plan = plan_endpoint(table, settings, seeds, folds, False, where)
    clean_inputs = {e["name"]: sample_inputs(table, e["features"], e["rows"], where) for e in encoders}
    fitted = fit_heads(table, plan, clean_inputs, seeds)

    test_positions = np.unique(np.concatenate([fold.test for fold in plan.folds[seeds[0]]]))
    test_rows = sorted({row for p in test_positions for row in table.rows[p].values()})
    from braindino.probe.fitting import select

    clean_preds = {(e["name"], seed): predict_positions(table, fitted, e["name"], seed, clean_inputs[e["name"]],
                                                         select(clean_inputs[e["name"]], test_positions),
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
                inputs = sample_inputs(condition_table, features[e["name"]], {r: r for r in available}, where)
                for seed in seeds:
                    condition_preds[(e["name"], seed)] = predict_positions(
                        table, fitted, e["name"], seed, clean_inputs[e["name"]], inputs, positions)
        if len(positions):
            index = np.searchsorted(test_positions, positions)
            for e in encoders:
                scores = score_condition(task, metric, [condition_preds[(e["name"], s)] for s in seeds],
                                         [subset(clean_preds[(e["name"], s)], index) for s in seeds],
                                         table.subjects[positions], n_bootstrap, CONFIDENCE)
                rows.append({"encoder": e["name"], "perturbation": perturbation, "parameter": spec_p.parameter,
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
              "encoders": [{"name": e["name"], "spec": e["spec"], "fingerprint": e["encoder"].fingerprint,
                            "parameters": e["encoder"].trainable_parameters()} for e in encoders],
              "perturbations": {p: {"parameter": PERTURBATIONS[p].parameter, "identity": PERTURBATIONS[p].identity,
                                    "severities": list(v), "description": PERTURBATIONS[p].description}
                                for p, v in chosen_grid.items()},
              "elapsed_s": round(perf_counter() - started, 2)}
    curves = {p: outputs.curve_figure(run_dir / "figures" / f"robustness_{p}.png", rows, p, metric)
              for p in chosen_grid}
    paths = {"table": outputs.write_table(run_dir / "robustness.csv", rows),
             "markdown": outputs.write_markdown(run_dir / "robustness.md", rows, header, curves),
             "metrics": outputs.write_metrics_json(run_dir / "metrics.json", header, rows, errors),
             "errors": outputs.write_errors(run_dir / "errors.csv", errors),
             "curves": curves}
    worst = outputs.worst_drops(rows)
    for e in encoders:
        print(outputs.console_line(e["name"], worst.get(e["name"]), metric))
    print(f"robustness: {len(conditions)} conditions × {len(encoders)} encoders on {len(test_positions)} test "
          f"samples in {perf_counter() - started:.1f}s -> {run_dir}/robustness.csv, "
          f"robustness.md, metrics.json, figures/" + (f"; {failed} failure(s), see errors.csv" if failed else ""))
    return paths, failed
