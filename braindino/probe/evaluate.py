"""Run one endpoint's protocol for every encoder on the same splits: fit heads, predict, score, compare.

A *cell* is (encoder, setting, seed): the head is fitted on each fold's training subset and predicts that fold's
test samples; the folds' predictions are pooled and put in sample-table order (each sample keeps its ``fold``, so
rank metrics are computed within folds), so every encoder, seed and setting of an endpoint is scored on the same
samples in the same order (CV: all samples; split: the test samples). Each cell is also scored per fold (the
corrected resampled t-test of ``compare`` uses those values). The bootstrap draws subjects (all of a drawn
subject's samples come along). Cells run in parallel worker processes (joblib).

Cells are flagged when their numbers mean little: fewer than ``MIN_TEST_SUBJECTS`` test subjects or
``MIN_PER_CLASS`` of a class (events for survival) in a test fold, or fewer than ``MIN_TRAIN_SUBJECTS`` training
subjects. A bootstrap CI resting on fewer than ``MIN_VALID_SHARE`` of its resamples gets a note.
"""

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning, FitFailedWarning
from threadpoolctl import threadpool_limits

from braindino.errors import InputError
from braindino.probe import metrics as M
from braindino.probe.compare import INTERVALS, aggregate, compare, fold_values, held_out_ratio
from braindino.probe.fitting import fit_predict, head_parameters, make_head, select
from braindino.probe.protocols import Setting, make_folds, strata, subsample
from braindino.probe.results import EndpointResult, MetricValue, Score
from braindino.probe.stats import clopper_pearson

BOOTSTRAP_SEED = 20240
MIN_TEST_SUBJECTS = 20
MIN_PER_CLASS = 5
MIN_TRAIN_SUBJECTS = 10
MIN_VALID_SHARE = 0.9


@dataclass
class Plan:
    """The splits of one endpoint: ``folds[seed]`` [Fold], ``subsets[(setting name, seed)]`` = per-fold training
    positions, ``settings`` actually run, ``notes`` on settings skipped."""

    folds: dict
    subsets: dict
    settings: list
    notes: list


@contextlib.contextmanager
def quiet_expected_warnings():
    """Silence what small cohorts make libraries say on every fit (a class smaller than the fold count, an inner
    fit that did not converge, a Cox line search dividing by zero): the probe's own notes and CIs report that
    honestly, once, and a console of hundreds of identical warnings hides the lines that matter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class in y", category=UserWarning)
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        warnings.filterwarnings("ignore", category=FitFailedWarning)
        warnings.filterwarnings("ignore", message="invalid value encountered", category=RuntimeWarning)
        yield


def plan_endpoint(table, settings: list[Setting], seeds: list[int], n_folds: int, explicit_shots: bool,
                  where) -> Plan:
    """Folds and training subsets for every (setting, seed); raises InputError when the protocol is impossible."""
    task, name = table.spec.task, table.spec.name
    stratum = strata(task, table.y)
    n = table.n_subjects
    if table.split is None and n < n_folds:
        raise InputError(where, f"endpoint {name!r}: {n} subjects for {n_folds}-fold cross-validation",
                         "label more subjects or pass a smaller --folds")
    if table.split is not None and ((table.split == "test").all() or not (table.split == "test").any()):
        raise InputError(where, f"endpoint {name!r}: the split column needs training (train/val) and test "
                                f"subjects", "assign both, or empty the split column to use cross-validation")
    if task == "survival" and not table.y["event"].any():
        raise InputError(where, f"endpoint {name!r}: no event among the subjects", "survival needs observed events")
    try:
        with quiet_expected_warnings():
            folds = {seed: make_folds(table.subjects, table.split, stratum, n_folds, seed) for seed in seeds}
    except ValueError as error:   # sklearn: every stratum has fewer subjects than folds
        if task == "classification":
            raise InputError(where, f"endpoint {name!r}: {n_folds}-fold cross-validation is impossible here "
                                    f"({error})", "label more subjects or pass a smaller --folds") from None
        # quartiles / events are only a balancing aid: too few subjects per stratum → plain subject-grouped folds
        folds = {seed: make_folds(table.subjects, table.split, None, n_folds, seed) for seed in seeds}
    kept, notes, subsets = [], [], {}
    for setting in settings:
        if setting.kind == "shot" and task != "classification":
            if explicit_shots:
                raise InputError(where, f"endpoint {name!r}: k-shot needs classes",
                                 "use --shots with classification only (fractions work for every task)")
            continue
        problem = _infeasible(table, stratum, folds, setting)
        if problem and (setting.kind != "shot" or explicit_shots):
            raise InputError(where, f"endpoint {name!r}: {problem}", "label more subjects or change the protocol")
        if problem:
            notes.append(f"{setting.name} skipped: {problem}")
            continue
        kept.append(setting)
        for seed in seeds:
            subsets[(setting.name, seed)] = [
                subsample(fold.train, stratum, setting, _subset_seed(seed, k), task == "classification")
                for k, fold in enumerate(folds[seed])]
    return Plan(folds, subsets, kept, notes)


def _infeasible(table, stratum, folds, setting: Setting) -> str | None:
    if table.spec.task != "classification":
        return None
    n_classes = len(table.classes)
    if n_classes < 2:
        return f"one class only ({table.classes[0]})"
    noun = "subject" if table.spec.unit == "subject" else "volume"
    for seed_folds in folds.values():
        for fold in seed_folds:
            counts = np.bincount(stratum[fold.train], minlength=n_classes)
            where = "in training" if fold.name == "test" else f"in the training part of {fold.name}"
            if (counts == 0).any():
                missing = table.classes[int(np.argmin(counts))]
                return f"class {missing} has no {noun} {where}" + (" (one class in training)"
                                                                   if (counts > 0).sum() < 2 else "")
            if setting.kind == "shot" and counts.min() < setting.amount:
                short = int(np.argmin(counts))
                return (f"{setting.name} needs {int(setting.amount)} {noun}s of class {table.classes[short]} "
                        f"{where}, found {counts.min()}")
    return None


def _subset_seed(seed: int, fold: int) -> int:
    """The permutation seed of one (seed, fold): shared by every setting, so training subsets are nested."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


def run_cell(task: str, spec, inputs, y: dict, folds, subsets, n_classes, seed: int,
             attention: bool = False, groups=None, factory=None) -> dict:
    """Fit + predict every fold of one cell → dict(pred: prediction set in sample order with ``fold`` [m] (the
    fold index), positions [m], fold_names [m], head_parameters, frozen_parameters (None unless the estimator
    says), n_train (mean over folds), notes [str]; with ``attention`` (MIL heads) also attention: [m] arrays [S_i]
    of slice weights, in the same order). ``groups`` [n] (the subject of every sample; volume unit): routed into
    every head's inner search. ``factory``: ``(task, spec, seed) -> estimator`` for the rows that bring their own
    (end-to-end training, :mod:`braindino.probe.trained`); default :func:`make_head`."""
    parts, positions, names, sizes, weights, notes, n_head, frozen = [], [], [], [], [], [], 0, None
    for k, (fold, train) in enumerate(zip(folds, subsets)):
        estimator = (factory or make_head)(task, spec, seed)
        part, fold_notes = fit_predict(task, estimator, inputs, y, train, fold.test, n_classes,
                                       None if groups is None else groups[train])
        part["fold"] = np.full(len(fold.test), k)
        parts.append(part)
        notes += [f"{fold.name}: {note}" for note in fold_notes]
        n_head = max(n_head, head_parameters(estimator))       # a fold that fell back fitted nothing
        frozen = getattr(estimator, "frozen_parameters_", frozen)
        if attention:
            weights += estimator.attention(select(inputs, fold.test))
        positions.append(fold.test)
        names += [fold.name] * len(fold.test)
        sizes.append(len(train))
    positions = np.concatenate(positions)
    order = np.argsort(positions, kind="stable")
    pred = {key: np.concatenate([part[key] for part in parts])[order] for key in parts[0]}
    output = {"pred": pred, "positions": positions[order], "fold_names": np.array(names)[order],
              "head_parameters": n_head, "frozen_parameters": frozen, "n_train": float(np.mean(sizes)),
              "notes": notes}
    if attention:
        output["attention"] = [weights[i] for i in order]
    return output


def score_cell(task: str, pred: dict, groups: np.ndarray, n_bootstrap: int, confidence: float) -> dict:
    """{metric: (value, low, high, n_valid)} with the endpoint-wide seeded subject-bootstrap draws (``groups`` [m]:
    the subject of each predicted sample). Balanced accuracy on a small test set (see ``flags``): the interval
    widened to hold the Clopper–Pearson interval of balanced accuracy × subjects successes among the subjects,
    where a percentile bootstrap collapses (8 perfectly classified subjects: [1.00, 1.00]; exact: [0.63, 1])."""
    draws = M.cluster_bootstrap_indices(groups, n_bootstrap, BOOTSTRAP_SEED)
    scores = M.score_with_ci(task, pred, draws, confidence)
    n_subjects = len(set(groups.tolist()))
    value, low, high, n_valid = scores.get("balanced_accuracy", (None,) * 4)
    if value is not None and np.isfinite(value) and _small_test(task, pred, groups):
        exact_low, exact_high = clopper_pearson(value * n_subjects, n_subjects, confidence)
        scores["balanced_accuracy"] = (value, min(exact_low, low if low is not None else 1.0),
                                       max(exact_high, high if high is not None else 0.0), n_valid)
    return scores


def _small_test(task: str, pred: dict, groups: np.ndarray) -> str | None:
    """Why the smallest test fold of a cell is too small to mean much, or None."""
    fold = pred.get("fold", np.zeros(len(groups), dtype=int))
    for k in np.unique(fold):
        inside = fold == k
        n = len(set(groups[inside].tolist()))
        if n < MIN_TEST_SUBJECTS:
            return f"small test set: {n} subjects (< {MIN_TEST_SUBJECTS})"
        if task == "classification":
            counts = [len(set(groups[inside & (pred["y_true"] == c)].tolist())) for c in range(pred["prob"].shape[1])]
            if min(counts) < MIN_PER_CLASS:
                return f"small test set: {min(counts)} subject(s) of a class (< {MIN_PER_CLASS})"
        if task == "survival" and len(set(groups[inside & pred["event"]].tolist())) < MIN_PER_CLASS:
            return f"small test set: fewer than {MIN_PER_CLASS} events"
    return None


def cell_flags(task: str, pred: dict, groups: np.ndarray, subjects: np.ndarray, subsets) -> list[str]:
    """The flags of one cell (``subsets``: its per-fold training positions; ``subjects`` [n] of every sample)."""
    flags = []
    small = _small_test(task, pred, groups)
    if small:
        flags.append(small)
    fewest = min(len(set(subjects[s].tolist())) for s in subsets)
    if fewest < MIN_TRAIN_SUBJECTS:
        flags.append(f"small training set: {fewest} subjects (< {MIN_TRAIN_SUBJECTS})")
    return flags


def evaluate_endpoint(table, plan: Plan, encoders: list[dict], seeds: list[int], n_bootstrap: int,
                      confidence: float, workers: int, progress) -> tuple[EndpointResult, list[dict]]:
    """Every cell of one endpoint → (EndpointResult, cell outputs for predictions.csv).

    encoders: [{"name", "parameters", "inputs", optional "factory"}] (the model first; ``parameters``: the
    encoder's frozen parameters; ``factory``: see :func:`run_cell`); ``progress``: a tqdm-like bar (``update``).
    MIL heads: the model's cell at 100 % with the first seed also returns its test samples' ``attention``.
    """
    spec, task = table.spec, table.spec.task
    n_classes = len(table.classes) if table.classes else None
    grouped = table.subjects if len(set(table.subjects.tolist())) < len(table.subjects) else None
    cells = [(encoder, setting, seed) for encoder in encoders for setting in plan.settings for seed in seeds]
    jobs = (delayed(_cell_job)(task, spec, encoder["inputs"], table.y, table.subjects, plan.folds[seed],
                               plan.subsets[(setting.name, seed)], n_classes, seed, n_bootstrap, confidence,
                               spec.pooling == "mil" and encoder is encoders[0] and seed == seeds[0]
                               and setting == Setting("fraction", 100.0), os.getpid(), grouped,
                               encoder.get("factory"))
            for encoder, setting, seed in cells)
    outputs = []
    for output in Parallel(n_jobs=workers, return_as="generator")(jobs):
        if "error" in output:
            raise InputError(*output["error"])
        outputs.append(output)
        progress.update(1)
    metric_names = M.metric_names(task)
    protocol = "cv" if table.split is None else "split"
    result = EndpointResult(
        name=spec.name, task=task, target=spec.target, time=spec.time, event=spec.event, mask=spec.mask,
        sequences=table.sequences, fusion=spec.fusion, pooling=spec.pooling,
        head="attention-mil" if spec.pooling == "mil" else spec.head,
        protocol=protocol, folds=plan_folds(plan), n_subjects=table.n_subjects,
        dropped=dict(table.dropped), classes=table.classes, metrics=metric_names, headline=M.HEADLINE[task],
        higher_is_better={m: m not in M.LOWER_IS_BETTER for m in metric_names},
        settings=[s.name for s in plan.settings], notes=list(plan.notes), unit=spec.unit,
        n_samples=len(table.samples), intervals=dict(INTERVALS[protocol]))
    rows = []
    for (encoder, setting, seed), output in zip(cells, outputs):
        frozen = output["frozen_parameters"]
        total = output["head_parameters"] + (encoder["parameters"] if frozen is None else frozen)
        subsets = plan.subsets[(setting.name, seed)]
        result.scores.append(Score(
            encoder=encoder["name"], setting=setting.name, kind=setting.kind, amount=setting.amount, seed=seed,
            n_train=output["n_train"], n_test=len(output["positions"]),
            metrics={m: MetricValue(*output["scores"][m]) for m in metric_names},
            head_parameters=output["head_parameters"],
            fraction_trained=output["head_parameters"] / total if total else 1.0,
            fold_metrics=output["fold_metrics"],
            test_train_ratio=held_out_ratio(plan.folds[seed], subsets, table.subjects),
            flags=cell_flags(task, output["pred"], table.subjects[output["positions"]], table.subjects, subsets)))
        rows.append({"encoder": encoder["name"], "setting": setting, "seed": seed, **output})
    by_cell = {(row["encoder"], row["setting"].name, row["seed"]): row["pred"] for row in rows}
    # every cell predicts the same samples in the same order
    groups = table.subjects[rows[0]["positions"]] if rows else table.subjects
    draws = M.cluster_bootstrap_indices(groups, n_bootstrap, BOOTSTRAP_SEED) if protocol == "split" else None
    result.aggregates = aggregate(result, [e["name"] for e in encoders], seeds, by_cell, draws, confidence)
    result.comparisons = compare(task, result, encoders, seeds, by_cell, groups, n_bootstrap, confidence, workers,
                                 BOOTSTRAP_SEED + 1)
    result.notes += cell_notes(result, rows, n_bootstrap)
    return result, rows


def cell_notes(result: EndpointResult, rows: list[dict], n_bootstrap: int) -> list[str]:
    """Endpoint notes from the cells: head fallbacks and non-convergence, undefined log-rank p-values, CIs
    resting on fewer than ``MIN_VALID_SHARE`` of the resamples, flagged cells — each kind once, with a count."""
    notes, grouped = [], {}
    for row in rows:                      # the same note in several folds / seeds of one row and setting: one line
        for note in row.get("notes", []):
            fold, _, text = note.partition(": ")
            grouped.setdefault((row["encoder"], row["setting"].name, text), []).append((row["seed"], fold))
    for (encoder, setting, text), places in grouped.items():
        if len(places) == 1:
            notes.append(f"{encoder} {setting} seed {places[0][0]}, {places[0][1]}: {text}")
        else:
            seeds = ", ".join(str(seed) for seed in dict.fromkeys(seed for seed, _ in places))
            notes.append(f"{encoder} {setting}, {len(places)} folds (seeds {seeds}): {text}")
    undefined = [s for s in result.scores if "logrank_p" in s.metrics and not np.isfinite(_nan(s.metrics[
        "logrank_p"].value))]
    if undefined:
        notes.append(f"logrank_p undefined (NaN) in {len(undefined)} cell(s): one risk group, no event, or zero "
                     "log-rank variance on the test subjects")
    for metric in result.metrics:
        shares = [s.metrics[metric].n_valid / n_bootstrap for s in result.scores
                  if s.metrics[metric].low is not None and n_bootstrap]
        low = [share for share in shares if share < MIN_VALID_SHARE]
        if low:
            notes.append(f"{metric}: the bootstrap CI of {len(low)} cell(s) rests on fewer than "
                         f"{MIN_VALID_SHARE:.0%} of the resamples (lowest {min(low):.0%}; the others lacked a class "
                         "or an event)")
    flagged = [s for s in result.scores if s.flags]
    if flagged:
        kinds = sorted({flag.split(":")[0] for s in flagged for flag in s.flags})
        notes.append(f"{len(flagged)} cell(s) flagged ({', '.join(kinds)}): their numbers mean little")
    return notes


def _nan(value):
    return float("nan") if value is None else value


def _cell_job(task, spec, inputs, y, subjects, folds, subsets, n_classes, seed, n_bootstrap, confidence,
              attention: bool, parent_pid: int, groups=None, factory=None) -> dict:
    """One cell with single-threaded BLAS (small matrices: threads only contend) and, in a worker process,
    single-threaded torch (the workers already use the cores). An InputError comes back as
    ``{"error": (path, cause, hint)}`` (it does not cross a process boundary as an exception)."""
    if os.getpid() != parent_pid and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    with threadpool_limits(limits=1), quiet_expected_warnings():
        try:
            output = run_cell(task, spec, inputs, y, folds, subsets, n_classes, seed, attention, groups, factory)
        except InputError as error:
            return {"error": (error.path, error.cause, error.hint)}
        output["scores"] = score_cell(task, output["pred"], subjects[output["positions"]], n_bootstrap, confidence)
        output["fold_metrics"] = fold_values(task, output["pred"], output["fold_names"],
                                             [m for m in M.metric_names(task) if m not in M.NOT_BOOTSTRAPPED])
    return output


def plan_folds(plan: Plan) -> int | None:
    first = next(iter(plan.folds.values()))
    return None if first[0].name == "test" else len(first)


