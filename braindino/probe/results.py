"""What a probe run found: the ``ProbeResults`` tree that ``metrics.json`` holds and the report is written from.

Layout (every level a dataclass; ``ProbeResults.to_dict()`` is exactly ``metrics.json``; ``from_dict`` reads it back)::

    ProbeResults
      run_dir, command, model (name of the encoder under test), seeds [int], n_bootstrap, confidence (0.95),
      predictions ("predictions.csv", relative to run_dir), elapsed_s,
      encoders: [EncoderInfo]          the model first, then the baselines, in the order they were run
      endpoints: [EndpointResult]      one per endpoint (one for a plain CLI run; several with --endpoints)

    EndpointResult
      name, task ("classification" | "regression" | "survival" | "segmentation"), target, time, event, mask,
      sequences [str] (fused per subject, in this order; unit volume: the sequences whose volumes are samples),
      fusion ("concat" | "mean"), pooling, head,
      protocol ("split": the manifest's split column, train+val → training, test → test | "cv": subject-grouped
      stratified k-fold, predictions pooled over the folds), folds (int | None),
      n_subjects (subjects with a label), dropped {reason: n rows} (e.g. "empty label": 3),
      unit ("subject": one sample per subject, its sequences fused | "volume": one sample per volume, e.g. MRI
      sequence classification; folds and bootstrap still go by subject), n_samples (= n_subjects for the subject
      unit; metrics.json written before units existed lacks both and reads back as subject unit),
      classes [str] | None (classification: the label values, in the column order of the probabilities),
      metrics [str] (names, report order), headline (the metric shown first), higher_is_better {metric: bool},
      settings [str] in order, e.g. ["1%", "10%", "25%", "50%", "100%", "1-shot", "5-shot"],
      scores [Score], aggregates [Aggregate], comparisons [Comparison], notes [str] (e.g. a skipped setting),
      mask_dir (segmentation: folder of predicted masks relative to run_dir, else None),
      intervals {"scores" | "aggregates" | "comparisons": what that interval is conditional on, in words}

    Score            one (encoder, setting, seed): predictions over the test samples (pooled over CV folds)
      encoder, setting, kind ("fraction" | "shot"), amount (percent, or shots per class), seed,
      n_train (training samples used, mean over folds for CV), n_test (samples predicted),
      metrics {metric: MetricValue}, head_parameters (trainable numbers in the head),
      fraction_trained = head_parameters / (head_parameters + encoder parameters),
      fold_metrics {metric: [K] values on each fold's test samples} (K = 1 for the split protocol),
      test_train_ratio (mean over folds of test subjects / training subjects), flags [str] (e.g. "small test set:
      8 subjects (< 20)", "small training set: 3 subjects (< 10)": numbers there mean little)

    MetricValue      value, low, high, n_valid: point estimate and 95 % bootstrap CI over the n_valid resamples where
                     the metric was defined (subjects resampled with all their samples; CONDITIONAL on this cell's
                     fitted heads: other test subjects, not other training subjects); low/high are None where no CI
                     is defined (logrank_p). Balanced accuracy on a small test set: the union of that interval and
                     the Clopper–Pearson interval of (balanced accuracy × test subjects) successes.

    Aggregate        encoder, setting, metric, mean, std (over seeds, ddof=0), n_seeds, low, high: the 95 % interval
                     of the seed mean — CV: corrected resampled t over the seeds × folds values (accounts for
                     refitting the heads); split: subject bootstrap of the seed mean (conditional on the fitted
                     heads). None for p-value metrics (logrank_p is never averaged over seeds).

    Comparison       model vs one baseline, one setting, the endpoint's headline metric, paired over the same test
                     samples: metric, setting, model, baseline, difference (model − baseline), low, high (95 % CI of
                     the difference), p_value (two-sided, unadjusted), n_subjects (test subjects), n_resamples,
                     method ("corrected resampled t" under CV: Nadeau–Bengio over the seeds × folds differences,
                     n_folds of them; "paired subject bootstrap" under a split: conditional on the fitted heads),
                     p_holm (Holm over the endpoint's comparisons: baselines × settings), p_holm_run (Holm over
                     the run's headline comparisons — every endpoint's smallest and largest fraction × baselines —
                     None for the others); verdicts use the adjusted p-values

Metric names: classification ``balanced_accuracy``, ``auc`` (macro one-vs-rest), ``f1_macro``; regression ``mae``,
``pearson_r``; survival ``c_index`` (Harrell), ``logrank_p`` (high vs low risk split at the training median risk);
segmentation ``dice_mean`` and ``dice_<label>`` per foreground label.

``predictions.csv`` (one row per endpoint × encoder × setting × seed × test sample): endpoint, encoder, setting,
kind, amount, seed, subject, sample (the subject, or "<subject>/<sequence>" for the volume unit), split (``test``
or ``fold-<k>``), y_true, then per task: classification ``y_pred`` and
``prob_<class>`` per class; regression ``y_pred``; survival ``risk``, ``time``, ``event``, ``risk_group``
(``high``/``low`` vs the training median); segmentation ``mask`` (predicted NIfTI, relative to run_dir) and
``dice_<label>``.
"""

from dataclasses import asdict, dataclass, field, fields

TASKS = ("classification", "regression", "survival", "segmentation")


@dataclass
class MetricValue:
    value: float
    low: float | None = None
    high: float | None = None
    n_valid: int | None = None


@dataclass
class EncoderInfo:
    name: str                 # display name: the model's spec, "random_like", "pixels", or a --baseline spec
    role: str                 # "model" | "baseline"
    spec: str                 # what load_encoder was given
    fingerprint: str          # 16 hex, the encoder's fingerprint
    parameters: int           # encoder parameters (0 for a non-deep baseline)
    features: str             # features folder used (absolute path)


@dataclass
class Score:
    encoder: str
    setting: str
    kind: str
    amount: float
    seed: int
    n_train: float
    n_test: int
    metrics: dict[str, MetricValue]
    head_parameters: int
    fraction_trained: float
    fold_metrics: dict[str, list[float]] = field(default_factory=dict)
    test_train_ratio: float | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class Aggregate:
    encoder: str
    setting: str
    metric: str
    mean: float
    std: float
    n_seeds: int
    low: float | None = None
    high: float | None = None


@dataclass
class Comparison:
    metric: str
    setting: str
    model: str
    baseline: str
    difference: float
    low: float
    high: float
    p_value: float
    n_subjects: int
    n_resamples: int
    method: str = "paired subject bootstrap"
    n_folds: int | None = None
    p_holm: float | None = None
    p_holm_run: float | None = None


@dataclass
class EndpointResult:
    name: str
    task: str
    target: str | None
    time: str | None
    event: str | None
    mask: str | None
    sequences: list[str]
    fusion: str
    pooling: str
    head: str
    protocol: str
    folds: int | None
    n_subjects: int
    dropped: dict[str, int]
    classes: list[str] | None
    metrics: list[str]
    headline: str
    higher_is_better: dict[str, bool]
    settings: list[str]
    scores: list[Score] = field(default_factory=list)
    aggregates: list[Aggregate] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mask_dir: str | None = None
    unit: str = "subject"
    n_samples: int | None = None
    intervals: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.n_samples is None:
            self.n_samples = self.n_subjects

    def score(self, encoder: str, setting: str, seed: int) -> Score:
        """The score of one (encoder, setting, seed); KeyError if that cell was not run."""
        for score in self.scores:
            if (score.encoder, score.setting, score.seed) == (encoder, setting, seed):
                return score
        raise KeyError((encoder, setting, seed))

    def aggregate(self, encoder: str, setting: str, metric: str) -> Aggregate:
        """Mean ± std over seeds of one metric; KeyError if absent."""
        for item in self.aggregates:
            if (item.encoder, item.setting, item.metric) == (encoder, setting, metric):
                return item
        raise KeyError((encoder, setting, metric))


@dataclass
class ProbeResults:
    run_dir: str
    command: str
    model: str
    seeds: list[int]
    n_bootstrap: int
    confidence: float
    predictions: str
    elapsed_s: float
    encoders: list[EncoderInfo]
    endpoints: list[EndpointResult]

    def to_dict(self) -> dict:
        """JSON-ready nested dict (the content of ``metrics.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ProbeResults":
        """Rebuild from ``to_dict()`` output (e.g. ``json.load`` of ``metrics.json``)."""
        endpoints = []
        for item in data["endpoints"]:
            item = dict(item)
            item["scores"] = [Score(**{**s, "metrics": {k: MetricValue(**v) for k, v in s["metrics"].items()}})
                              for s in item["scores"]]
            item["aggregates"] = [Aggregate(**a) for a in item["aggregates"]]
            item["comparisons"] = [Comparison(**c) for c in item["comparisons"]]
            endpoints.append(EndpointResult(**item))
        top = {f.name: data[f.name] for f in fields(cls)}
        top["encoders"] = [EncoderInfo(**e) for e in data["encoders"]]
        top["endpoints"] = endpoints
        return cls(**top)
