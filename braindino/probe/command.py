"""``braindino probe`` / ``python probe.py``: does a frozen encoder predict my endpoint? Metrics with CIs, the same
splits for the model and its baselines, paired tests, ``metrics.json``, ``predictions.csv`` and ``report.md``.

Exit status: 0 when every endpoint was scored on every labelled subject; 1 when some volumes could not be embedded
(their subjects are left out, see ``RUN/features/<encoder>/errors.csv``); 2 when nothing was done (bad manifest,
labels, options or model: one ``error:`` line); 130 when interrupted.
"""

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from braindino.errors import InputError
from braindino.probe.endpoints import (FUSIONS, HEADS, POOLINGS, UNITS, EndpointSpec, endpoints_from_yaml,
                                      parse_sequences)
from braindino.probe.results import TASKS

DEFAULT_BASELINES = ("random_like", "pixels")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="encoder under test: a braindino model folder (braindino "
                        "export), random:<arch>, pixels[:grid] or a timm local-dir ViT folder")
    parser.add_argument("--baseline", action="append", default=[], metavar="SPEC",
                        help="extra baseline encoder (same specs as --model; random:/pixels copy the model's "
                             "preprocessing); repeatable")
    parser.add_argument("--no-default-baselines", action="store_true",
                        help=f"do not add the default baselines {', '.join(DEFAULT_BASELINES)} (random init of "
                             "the model's architecture; the non-deep pixel baseline)")
    parser.add_argument("--manifest", required=True, metavar="CSV", help="manifest: path, subject, optional "
                        "sequence, split (train/val/test; used when every row has one, else CV), label columns")
    parser.add_argument("--task", choices=TASKS, help="what the --target is (not needed with --endpoints)")
    parser.add_argument("--target", metavar="COL", help="label column (classification / regression)")
    parser.add_argument("--time", metavar="COL", help="survival: time-to-event column (> 0)")
    parser.add_argument("--event", metavar="COL", help="survival: event column (1 event, 0 censored)")
    parser.add_argument("--mask", metavar="COL", default=None,
                        help="segmentation: column of label files on the image's voxel grid (default: mask)")
    parser.add_argument("--sequences", metavar="LIST", help="comma-separated sequences fused per subject, e.g. "
                        "T1c,FLAIR (default: every sequence in the manifest)")
    parser.add_argument("--fusion", choices=FUSIONS, default="concat",
                        help="how a subject's sequences are fused: concat or mean of pooled vectors (default concat)")
    parser.add_argument("--pooling", choices=POOLINGS, default="mean",
                        help="slice pooling (default mean): mean, max or meanmax of each slice's CLS ‖ mean patch "
                             "token; hemispheres: mean and max over slices of (left - right) ‖ (left + right)/2 of "
                             "the mean patch tokens of the patient's left and right half of the slice, for the side "
                             "of a one-sided finding (needs features from this braindino); mil: an attention-MIL "
                             "head over the slices")
    parser.add_argument("--head", choices=HEADS, default="linear",
                        help="head on pooled features: linear (default), mlp, or knn (DINO's weighted kNN)")
    parser.add_argument("--unit", choices=UNITS, default="auto",
                        help="sample unit: subject (its sequences fused, one label per subject) or volume (each "
                             "manifest row a sample, e.g. --target sequence; folds and bootstrap still group by "
                             "subject); auto: volume when the target is 'sequence' or differs within a subject")
    parser.add_argument("--brain-age-correction", action="store_true",
                        help="regression: wrap the linear/MLP head in a brain-age bias correction fitted on the "
                             "training data only")
    parser.add_argument("--fractions", default="1,10,25,50,100", metavar="LIST",
                        help="training fractions in percent (default 1,10,25,50,100)")
    parser.add_argument("--shots", default=None, metavar="LIST",
                        help="k-shot settings per class for classification (default 1,5 where every class has "
                             "enough training subjects; pass an empty string for none)")
    parser.add_argument("--seeds", default="0,1,2", metavar="LIST", help="seeds (default 0,1,2)")
    parser.add_argument("--folds", type=int, default=5, help="CV folds when there is no split column (default 5)")
    parser.add_argument("--skip-infeasible", action="store_true",
                        help="with several endpoints: skip (with one line each) those this cohort cannot support "
                             "(too few labelled subjects or classes) instead of stopping")
    parser.add_argument("--protocol", choices=("auto", "split", "cv"), default="auto",
                        help="split: train on the manifest's train+val rows, test on its test rows; cv: subject-"
                             "grouped k-fold over every labelled subject (ignores the split column); auto (default): "
                             "split when every subject has one, else cv")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples of subjects for CIs and paired tests (default 1000)")
    parser.add_argument("--features", metavar="FEATURES", help="features of --model made by braindino extract "
                        "(default: extract into RUN/features/<encoder>/, reused on a rerun)")
    parser.add_argument("--endpoints", metavar="YAML", help="several endpoints of this cohort: a list of {name, "
                        "task, target, time, event, mask, sequences, pooling, head, fusion, unit, "
                        "brain_age_correction}")
    parser.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))), metavar="N",
                        help="processes for extraction and for fitting/bootstrap (default: up to 4 cores)")
    parser.add_argument("--batch-size", type=int, default=64, help="slices per encoder batch (default 64)")
    parser.add_argument("--slice-stride", type=int, default=1, metavar="K",
                        help="embed every K-th kept axial slice only: K times less extraction (default 1; "
                             "segmentation needs 1)")
    parser.add_argument("--device", default=None, help="encoder device (default cuda > mps > cpu)")
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder for metrics.json, "
                        "predictions.csv, report.md, figures/, features/, masks/, attention/")


def run(args: argparse.Namespace) -> int:
    try:
        return probe(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted — features extracted so far are kept in {args.out}/features; rerun to continue",
              file=sys.stderr)
        return 130


def _numbers(text, name: str, kind=float) -> list:
    if text is None or str(text).strip() == "":
        return []
    try:
        values = [kind(item) for item in str(text).split(",") if item.strip()]
    except ValueError:
        raise InputError(f"--{name}", f"not a comma-separated list of numbers: {text!r}",
                         f"write e.g. --{name} 1,10,100") from None
    return values


def _options(args):
    fractions = _numbers(args.fractions, "fractions")
    if any(not 0 < f <= 100 for f in fractions):
        raise InputError("--fractions", "fractions must be in (0, 100] percent", "write e.g. --fractions 10,100")
    shots = _numbers(args.shots if args.shots is not None else "1,5", "shots", int)
    if any(k < 1 for k in shots):
        raise InputError("--shots", "shots must be at least 1 per class", "write e.g. --shots 1,5")
    seeds = _numbers(args.seeds, "seeds", int)
    if not seeds or not fractions and not shots:
        raise InputError("--seeds/--fractions", "nothing to run", "give at least one seed and one fraction")
    if args.folds < 2:
        raise InputError("--folds", "cross-validation needs at least 2 folds", "pass --folds 5")
    if args.slice_stride < 1:
        raise InputError("--slice-stride", f"must be at least 1, got {args.slice_stride}", "pass --slice-stride 1")
    return fractions, shots, seeds


def endpoint_specs(args) -> list[EndpointSpec]:
    """The endpoints of this run: ``--endpoints`` YAML (command-line values as defaults) or the one CLI endpoint."""
    defaults = dict(task=args.task, target=args.target, time=args.time, event=args.event, mask=args.mask,
                    sequences=args.sequences, fusion=args.fusion, pooling=args.pooling, head=args.head,
                    unit=args.unit, brain_age_correction=args.brain_age_correction)
    if args.endpoints:
        return endpoints_from_yaml(args.endpoints, defaults)
    if not args.task:
        raise InputError("command line", "no --task given", "pass --task and --target, or --endpoints FILE.yaml")
    if args.task == "segmentation" and not args.mask:
        defaults["mask"] = "mask"
    name = args.target or defaults["mask"] or args.task
    return [EndpointSpec(name=name, **{**defaults, "sequences": parse_sequences(args.sequences)})
            .check("command line")]


def probe(args) -> int:
    from braindino.manifest import assert_no_duplicate_rows, read_manifest
    from braindino.probe.endpoints import build_table, mask_grid_mismatch
    from braindino.probe.evaluate import plan_endpoint
    from braindino.probe.protocols import parse_settings

    started = time.perf_counter()
    run_dir = Path(args.out)
    fractions, shots, seeds = _options(args)
    settings = parse_settings(fractions, shots)
    explicit_shots = args.shots is not None
    manifest = read_manifest(args.manifest)
    assert_no_duplicate_rows(manifest)
    where = manifest.attrs["manifest_path"]
    specs = endpoint_specs(args)
    tables = []
    for spec in specs:
        try:
            table = apply_protocol(build_table(manifest, spec), args.protocol, where)
            plan_endpoint(table, settings, seeds, args.folds, explicit_shots, where)
        except InputError as err:
            if not args.skip_infeasible:
                raise
            print(f"probe: endpoint {spec.name!r} skipped: {err.cause} — {err.hint}", file=sys.stderr)
            continue
        tables.append(table)
    if not tables:
        raise InputError(where, "no endpoint can be probed on this cohort", "label more subjects")
    for table in tables:
        if table.spec.task == "segmentation":
            for rows, mask in zip(table.rows, table.y["mask"]):
                image = manifest.at[next(iter(rows.values())), "path"]
                problem = mask_grid_mismatch(image, mask)
                if problem:
                    raise InputError(mask, problem, "the mask must be on its image's voxel grid (same shape and "
                                                    "affine); resample it with nearest-neighbour first")

    encoders = load_encoders(args)
    used_rows = sorted({row for table in tables for rows in table.rows for row in rows.values()})
    used = manifest.loc[used_rows]
    used.attrs.update(manifest.attrs)
    patch_tokens = any(t.spec.task == "segmentation" for t in tables)
    if patch_tokens and args.slice_stride != 1:
        raise InputError("--slice-stride", "segmentation predicts every slice of a volume",
                         "pass --slice-stride 1 (or probe the segmentation endpoint in its own run)")
    failed = extract_all(args, encoders, used, run_dir, patch_tokens)
    return evaluate_all(args, manifest, tables, encoders, settings, seeds, explicit_shots, failed, run_dir,
                        started)


def apply_protocol(table, protocol: str, where):
    """``--protocol cv`` drops the table's split (cross-validation over every subject); ``split`` requires one."""
    if protocol == "cv":
        table.split = None
    elif protocol == "split" and table.split is None:
        raise InputError(where, f"endpoint {table.spec.name!r}: --protocol split needs a train/val/test split for "
                                "every subject", "fill in the split column, or use --protocol cv")
    return table


def load_encoders(args) -> list[dict]:
    """[{name, role, spec, slug, encoder}]: the model first, then the baselines (default + --baseline)."""
    from braindino import load_encoder

    model = load_encoder(args.model, device=args.device)
    model_name = Path(args.model).name if os.path.isdir(args.model) else str(args.model)
    entries = [dict(name=model_name, role="model", spec=str(args.model), encoder=model)]
    specs = ([] if args.no_default_baselines else list(DEFAULT_BASELINES)) + list(args.baseline)
    for spec in dict.fromkeys(specs):
        if spec == "random_like":   # a model that is itself random:<arch>:0 gets a baseline with other weights
            encoder = model.random_like(seed=0)
            if encoder.fingerprint == model.fingerprint:
                encoder = model.random_like(seed=1)
        else:
            encoder = load_encoder(spec, device=args.device, like=model)
        name = Path(spec).name if os.path.isdir(spec) else spec
        entries.append(dict(name=name, role="baseline", spec=spec, encoder=encoder))
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise InputError("--baseline", "two encoders share a name", "give each baseline once")
    for entry in entries:
        entry["slug"] = "".join(c if c.isalnum() or c in "-_." else "_" for c in entry["name"])
    return entries


def extract_all(args, encoders: list[dict], used, run_dir: Path, patch_tokens: bool) -> int:
    """Features for every encoder (``entry["features"]``, ``entry["rows"]`` manifest row → index position);
    returns the number of (encoder, volume) pairs that could not be embedded. The encoders without ``--features``
    are extracted together (:func:`~braindino.extract.cohort.extract_cohorts`: each volume is read once per
    distinct preprocessing, not once per encoder) into ``RUN/features/<encoder>/``."""
    from braindino.extract import open_features
    from braindino.extract.cohort import extract_cohorts
    from braindino.probe.inputs import check_fingerprint, feature_rows

    jobs = []
    for entry in encoders:
        if entry["role"] == "model" and args.features:
            entry["features"] = open_features(args.features)
            check_fingerprint(entry["features"], entry["encoder"], args.features)
        else:
            folder = run_dir / "features" / entry["slug"]
            print(f"probe: features of {entry['name']} -> {folder}", file=sys.stderr)
            jobs.append((entry, folder))
    extracted = extract_cohorts([(entry["encoder"], folder) for entry, folder in jobs], used,
                                batch_size=args.batch_size, workers=args.workers, patch_tokens=patch_tokens,
                                slice_stride=args.slice_stride) if jobs else []
    for (entry, _folder), (features, _report) in zip(jobs, extracted):
        entry["features"] = features
    failed = 0
    for entry in encoders:
        encoder, features = entry["encoder"], entry["features"]
        entry["rows"] = feature_rows(features, used)
        failed += len(used) - len(entry["rows"])
        entry["encoder"] = None          # free the encoder's memory; only its description is needed from here
        entry["parameters"] = encoder.trainable_parameters()
        entry["fingerprint"] = encoder.fingerprint
        if patch_tokens and entry["rows"] and "patch" not in features.load(next(iter(entry["rows"].values()))):
            raise InputError(features.root, "features hold no patch tokens (segmentation decodes them)",
                             "extract with --patch-tokens, or leave out --features to extract here")
    return failed


def evaluate_all(args, manifest, tables, encoders, settings, seeds, explicit_shots, failed, run_dir, started) -> int:
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
    embedded = set.intersection(*(set(e["rows"]) for e in encoders))
    tables = [restrict(table, embedded, "not embedded") for table in tables]
    plans = [plan_endpoint(table, settings, seeds, args.folds, explicit_shots, where) for table in tables]
    total = sum(len(encoders) * len(plan.settings) * len(seeds) for plan in plans)
    bar = tqdm(total=total, desc="probe", unit="fit", file=sys.stderr)
    endpoints, rows, lines = [], [], []
    for table, plan in zip(tables, plans):
        spec = table.spec
        if spec.task == "segmentation":
            for entry in encoders:
                entry["rows_by_subject"] = [entry["rows"][next(iter(r.values()))] for r in table.rows]
            seg = [dict(name=e["name"], slug=e["slug"], parameters=e["parameters"], features=e["features"],
                        rows=e["rows_by_subject"], grid=e["features"].model["grid"],
                        slice_size=e["features"].model["preprocessing"]["size"]) for e in encoders]
            result, cells = evaluate_segmentation(table, plan, seg, seeds, args.bootstrap, 0.95, run_dir, bar)
        else:
            inputs, slices = [], []
            for entry in encoders:
                bags = SubjectBags(table, entry["features"], entry["rows"])
                if spec.pooling == "mil":
                    encoder_inputs, encoder_slices = bags.mil(spec.fusion, where)
                    slices.append(encoder_slices)
                else:
                    encoder_inputs = bags.pooled(spec.pooling, spec.fusion)
                inputs.append(dict(name=entry["name"], parameters=entry["parameters"], inputs=encoder_inputs))
            result, cells = evaluate_endpoint(table, plan, inputs, seeds, args.bootstrap, 0.95,
                                              max(1, args.workers), bar)
            for cell in cells:
                if "attention" in cell:
                    write_attention(run_dir / "attention" / f"{spec.name}.csv", table, cell, slices[0])
        endpoints.append(result)
        rows += prediction_rows(table, cells)
        lines += headline_lines(result, seeds)
    bar.close()
    command_line = getattr(args, "command_line", None) or shlex.join(["probe.py", *sys.argv[1:]])  # set by the CLIs
    results = ProbeResults(
        run_dir=str(run_dir.resolve()), command=command_line, model=encoders[0]["name"],
        seeds=list(seeds), n_bootstrap=args.bootstrap, confidence=0.95, predictions="predictions.csv",
        elapsed_s=round(time.perf_counter() - started, 2),
        encoders=[EncoderInfo(e["name"], e["role"], e["spec"], e["fingerprint"], e["parameters"],
                              str(Path(e["features"].root).resolve())) for e in encoders],
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
          f"{time.perf_counter() - started:.1f}s -> {run_dir}/metrics.json, predictions.csv, report.md{missing}")
    return 1 if failed else 0
