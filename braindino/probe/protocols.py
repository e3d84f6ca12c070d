"""Evaluation protocols split by SUBJECT: train/test folds, training fractions, k-shot subsets, seeds.

Everything here works on positions 0..n-1 of an endpoint's sample table: one sample per subject (all of a subject's
sequences fused into it) or, with the volume unit, one per volume, each carrying its subject. Folds are grouped by
subject, so a subject — and every volume of it — is always wholly in training or in test.

- ``make_folds``: the manifest's split column when every sample has one (train + val → training, test → test),
  else subject-grouped stratified k-fold CV (``StratifiedGroupKFold`` grouped by subject, shuffled by the seed).
- ``subsample``: a training fraction (stratified, ≥ 1 sample per class for classification) or k shots per class,
  drawn from the fold's training part only (so from training subjects only; volumes of a training subject may be
  drawn apart). Sizes are nested: one permutation per (seed, fold, stratum), every setting takes a prefix of it, so
  the 10 % subset lies inside the 25 % subset, 1-shot inside 5-shot, and a learning curve compares like with like.
"""

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

N_QUANTILE_BINS = 4          # regression targets are stratified on quartiles


@dataclass(frozen=True)
class Setting:
    """One training-set size: ``kind`` "fraction" (``amount`` percent of the training part) or "shot"
    (``amount`` samples per class)."""

    kind: str
    amount: float

    @property
    def name(self) -> str:
        if self.kind == "fraction":
            return f"{self.amount:g}%"
        return f"{int(self.amount)}-shot"


@dataclass(frozen=True)
class Fold:
    """Positions into the sample table: ``train`` [n_train] int, ``test`` [n_test] int; ``name`` is "test" for
    the manifest's split, "fold-<k>" for CV."""

    name: str
    train: np.ndarray
    test: np.ndarray


def strata(task: str, y: dict) -> np.ndarray | None:
    """[n] int stratum of each sample: class code (classification), target quartile (regression), event
    (survival); None for segmentation (no stratification)."""
    if task == "classification":
        return np.asarray(y["code"], dtype=int)
    if task == "regression":
        values = np.asarray(y["value"], dtype=float)
        edges = np.quantile(values, np.linspace(0, 1, N_QUANTILE_BINS + 1)[1:-1])
        return np.searchsorted(edges, values, side="right")
    if task == "survival":
        return np.asarray(y["event"], dtype=int)
    return None


def make_folds(subjects: np.ndarray, split: np.ndarray | None, stratum: np.ndarray | None, n_folds: int,
               seed: int) -> list[Fold]:
    """Train/test folds over the sample table; no subject is in both parts of a fold.

    subjects [n] str: each sample's subject (unique for the subject unit); split [n] str in {"train", "val",
    "test"} (one per subject) or None (then CV); stratum [n] int or None.
    CV: ``StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)`` with groups = subjects.
    """
    n = len(subjects)
    if split is not None:
        split = np.asarray(split)
        return [Fold("test", np.flatnonzero(split != "test"), np.flatnonzero(split == "test"))]
    labels = np.zeros(n, dtype=int) if stratum is None else np.asarray(stratum)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [Fold(f"fold-{k}", np.sort(train), np.sort(test))
            for k, (train, test) in enumerate(splitter.split(np.zeros((n, 1)), labels, groups=subjects))]


def subsample(train: np.ndarray, stratum: np.ndarray | None, setting: Setting, seed: int,
              at_least_one_per_stratum: bool) -> np.ndarray:
    """Sorted positions [m] ⊆ ``train`` for one setting.

    fraction: round(percent/100 × n) samples drawn per stratum in proportion (largest remainders), ≥ 1 per stratum
    when ``at_least_one_per_stratum`` (classification), ≥ 2 overall; shot: ``amount`` samples of every class
    (``stratum`` = class codes; the caller checked there are enough). Each stratum's samples are permuted once by
    ``seed`` (the same for every setting of a fold) and the first ones taken: smaller settings are subsets of
    larger ones.
    """
    rng = np.random.default_rng(seed)
    if setting.kind == "fraction" and setting.amount >= 100:
        return np.sort(train)
    groups = np.zeros(len(train), dtype=int) if stratum is None else np.asarray(stratum)[train]
    values, counts = np.unique(groups, return_counts=True)
    if setting.kind == "shot":
        take = np.full(len(values), int(setting.amount))
    else:
        total = max(2, int(round(setting.amount / 100 * len(train))))
        take = _proportional(counts, total)
        if at_least_one_per_stratum:
            take = np.maximum(take, 1)
    orders = [rng.permutation(train[groups == value]) for value in values]      # one per stratum, setting-free
    chosen = [order[:min(k, c)] for order, k, c in zip(orders, take, counts)]
    return np.sort(np.concatenate(chosen))


def _proportional(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer allocation [len(counts)] of ``total`` items in proportion to ``counts`` (largest remainders)."""
    exact = counts / counts.sum() * min(total, counts.sum())
    take = np.floor(exact).astype(int)
    remainder_order = np.argsort(-(exact - take), kind="stable")
    take[remainder_order[:int(round(exact.sum())) - take.sum()]] += 1
    return take


def parse_settings(fractions: list[float], shots: list[int]) -> list[Setting]:
    """Settings in report order: fractions ascending, then shots ascending."""
    return ([Setting("fraction", float(f)) for f in sorted(set(fractions))] +
            [Setting("shot", int(k)) for k in sorted(set(shots))])
