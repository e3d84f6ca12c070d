"""Endpoints: what to predict (``EndpointSpec``) and the validated label table of its samples (``SubjectTable``).

The sample unit is the subject (its volumes, one per requested sequence, fused into one input; one label per
subject) or the volume (each manifest row its own sample, for labels that vary within a subject such as the MRI
sequence). Either way every sample knows its subject, and every protocol splits by subject. Labels are checked
before any work; every problem is one ``InputError`` line.
"""

import os
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import yaml

from braindino.errors import InputError
from braindino.manifest import FIRST_DATA_ROW, ROWS_SHOWN
from braindino.probe.results import TASKS

FUSIONS = ("concat", "mean")
POOLINGS = ("mean", "max", "meanmax", "hemispheres", "mil")
HEADS = ("linear", "mlp", "knn")
UNITS = ("auto", "subject", "volume")
# A label cell holding one of these (any case, surrounding spaces ignored) counts as missing, like an empty cell.
MISSING_LABEL_TOKENS = ("n/a", "na", "nan", "null", "<na>", "#n/a")   # "None" too, exactly (pandas)
SPEC_KEYS = ("name", "task", "target", "time", "event", "mask", "sequences", "fusion", "pooling", "head", "unit",
             "brain_age_correction")


@dataclass
class EndpointSpec:
    """One endpoint. ``target``: label column (classification/regression); ``time``/``event``: survival columns;
    ``mask``: segmentation label-file column; ``sequences``: sequences fused per subject, or with ``unit``
    "volume" the sequences whose rows are samples (None = all in the manifest); ``pooling`` "mil" means an
    attention-MIL head over the slices (``head`` is then ignored); ``unit``: "subject", "volume" or "auto" (decided
    by ``build_table``); ``brain_age_correction``: regression only, wrap the head in ``heads.BrainAgeCorrection``."""

    name: str
    task: str
    target: str | None = None
    time: str | None = None
    event: str | None = None
    mask: str | None = None
    sequences: list[str] | None = None
    fusion: str = "concat"
    pooling: str = "mean"
    head: str = "linear"
    unit: str = "subject"
    brain_age_correction: bool = False

    def columns(self) -> list[str]:
        """The manifest columns this endpoint reads."""
        return [c for c in (self.target, self.time, self.event, self.mask) if c]

    def check(self, where) -> "EndpointSpec":
        """Raise InputError (naming ``where``) for an impossible combination; return self."""
        def bad(cause, hint):
            raise InputError(where, f"endpoint {self.name!r}: {cause}", hint)
        if self.task not in TASKS:
            bad(f"unknown task {self.task!r}", f"use one of {', '.join(TASKS)}")
        needed = {"classification": ("target",), "regression": ("target",), "survival": ("time", "event"),
                  "segmentation": ("mask",)}[self.task]
        for name in needed:
            if not getattr(self, name):
                bad(f"{self.task} needs a {name} column", f"pass --{name} COLUMN")
        for name, value, allowed in (("fusion", self.fusion, FUSIONS), ("pooling", self.pooling, POOLINGS),
                                     ("head", self.head, HEADS), ("unit", self.unit, UNITS)):
            if value not in allowed:
                bad(f"unknown {name} {value!r}", f"use one of {', '.join(allowed)}")
        if self.head == "knn" and self.task not in ("classification", "regression") and self.pooling != "mil":
            bad("the kNN probe predicts classes or numbers only", "use --head linear or mlp for this task")
        if self.task == "segmentation" and self.sequences is not None and len(self.sequences) != 1:
            bad("segmentation reads one sequence per subject", "pass one sequence, e.g. --sequences FLAIR")
        if self.task == "segmentation" and self.unit == "volume":
            bad("segmentation runs per subject", "leave out unit volume (one sequence per subject is one volume)")
        if not isinstance(self.brain_age_correction, bool):
            bad("brain_age_correction is not true or false", "write brain_age_correction: true")
        if self.brain_age_correction and (self.task != "regression" or self.pooling == "mil"
                                          or self.head not in ("linear", "mlp")):
            bad("brain-age correction wraps a linear or MLP regression head", "use it with --task regression and "
                                                                              "--head linear or mlp")
        return self


def endpoints_from_yaml(path, defaults: dict) -> list[EndpointSpec]:
    """Endpoints listed in a YAML file: a list of mappings with keys among ``SPEC_KEYS`` (``sequences`` a list or a
    comma-separated string); missing keys take ``defaults`` (the command-line values)."""
    try:
        with open(path, encoding="utf-8") as handle:
            items = yaml.safe_load(handle)
    except OSError as error:
        raise InputError(path, f"cannot read endpoints file ({error.strerror or error})", "check the path") from None
    except yaml.YAMLError as error:
        raise InputError(path, f"not valid YAML ({str(error).splitlines()[0]})", "fix the YAML syntax") from None
    if isinstance(items, dict) and "endpoints" in items:
        items = items["endpoints"]
    if not isinstance(items, list) or not items or not all(isinstance(item, dict) for item in items):
        raise InputError(path, "expected a non-empty list of endpoints", "write '- {name: age, task: regression, "
                                                                         "target: age}' per endpoint")
    specs = []
    for number, item in enumerate(items, 1):
        unknown = sorted(set(item) - set(SPEC_KEYS))
        if unknown:
            raise InputError(path, f"endpoint {number}: unknown key(s) {', '.join(unknown)}",
                             f"use keys among {', '.join(SPEC_KEYS)}")
        merged = {k: v for k, v in {**defaults, **item}.items() if v is not None and k in SPEC_KEYS}
        merged["sequences"] = parse_sequences(merged.get("sequences"))
        merged["name"] = str(merged.get("name") or merged.get("target") or merged.get("mask")
                             or f"endpoint{number}")
        if "task" not in merged:
            raise InputError(path, f"endpoint {number}: no task", f"add task: one of {', '.join(TASKS)}")
        specs.append(EndpointSpec(**merged).check(path))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise InputError(path, "two endpoints share a name", "give each endpoint a unique name")
    return specs


def parse_sequences(value) -> list[str] | None:
    """``"T1c,FLAIR"`` or ``["T1c", "FLAIR"]`` → ``["T1c", "FLAIR"]``; None/empty → None."""
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(item).strip() for item in items if str(item).strip()] or None


@dataclass
class SubjectTable:
    """The endpoint's samples (n) with their inputs and labels; ``spec.unit`` is resolved ("subject" | "volume").

    samples [n] str sample ids (the subject, or "<subject>/<sequence>" — "<subject>/row<N>" when the subject has
    two rows of that sequence — for the volume unit); subjects [n] str: the subject of each sample (the groups every
    protocol splits by; unique for the subject unit); rows [n] dicts sequence → manifest row index (one entry per
    sample for the volume unit); split [n] str or None (None: no usable split column → CV); y: classification
    ``code`` [n] int; regression ``value`` [n] float; survival ``time`` [n] float, ``event`` [n] bool; segmentation
    ``mask`` [n] str (path); classes: class names (code order) or None; dropped: {reason: manifest rows}.
    """

    spec: EndpointSpec
    sequences: list[str]
    samples: np.ndarray
    subjects: np.ndarray
    rows: list[dict]
    split: np.ndarray | None
    y: dict
    classes: list[str] | None
    dropped: dict[str, int] = field(default_factory=dict)
    unlabelled_subjects: tuple[str, ...] = ()   # subjects with a row dropped for an empty or missing label

    @property
    def n_subjects(self) -> int:
        return len(set(self.subjects.tolist()))


def build_table(manifest: pd.DataFrame, spec: EndpointSpec) -> SubjectTable:
    """Validate ``spec``'s columns and labels on ``manifest`` (from ``read_manifest``) and build its samples.

    Subject unit: a subject's label comes from whichever of its rows have one (they must agree); a subject with no
    label, or without one of the sequences, is dropped for this endpoint and its rows counted in ``dropped``.
    Volume unit: every row of the chosen sequences with a label is a sample. ``spec.unit`` "auto" becomes "volume"
    when the target is the ``sequence`` column or differs between the rows of one subject, else "subject".
    """
    where = manifest.attrs.get("manifest_path", "manifest")
    for column in spec.columns():
        if column not in manifest.columns:
            raise InputError(where, f"endpoint {spec.name!r}: no column {column!r} (columns: "
                                    f"{', '.join(map(str, manifest.columns))})", "pass one of the manifest's columns")
    present = sorted(set(manifest["sequence"]))
    sequences = spec.sequences or present
    unknown = [s for s in sequences if s not in present]
    if unknown:
        raise InputError(where, f"endpoint {spec.name!r}: no rows of sequence {', '.join(unknown)} (sequences: "
                                f"{', '.join(s or '(empty)' for s in present)})", "pass --sequences among those")
    if spec.task == "segmentation" and len(sequences) != 1:
        raise InputError(where, f"endpoint {spec.name!r}: segmentation reads one sequence per subject, the manifest "
                                f"has {', '.join(sequences)}", "pass one of them with --sequences")
    table = manifest[manifest["sequence"].isin(sequences)]
    values, empty = _labels(where, table, spec)
    spec = replace(spec, unit=_resolve_unit(table, spec, values, empty))
    build = _volume_samples if spec.unit == "volume" else _subject_samples
    samples, subjects, rows, labels, splits, dropped = build(where, table, spec, sequences, values, empty)
    unlabelled_subjects = set(table.loc[empty.to_numpy(), "subject"].astype(str))
    if spec.unit == "subject":   # a subject keeps its label from another row
        unlabelled_subjects -= set(subjects)
    unlabelled_subjects = tuple(sorted(unlabelled_subjects))
    if not samples:
        raise InputError(where, f"endpoint {spec.name!r}: no subject has a label"
                                + (f" and all of {', '.join(sequences)}"
                                   if len(sequences) > 1 and spec.unit == "subject" else ""),
                         "fill in the label column")
    split_of = {}
    for subject, split in zip(subjects, splits):
        split_of.setdefault(subject, set()).update(split)
    bad = [subject for subject, split in split_of.items() if len(split) > 1]
    if bad:
        raise InputError(where, f"subject {bad[0]} has rows in different splits", "put all rows of a subject in "
                                                                                   "one split")
    split = np.array([next(iter(split_of[subject])) for subject in subjects])
    split = split if (split != "").all() else None
    y, classes = _targets(spec, labels)
    return SubjectTable(spec, sequences, np.array(samples), np.array(subjects), rows, split, y, classes, dropped,
                        unlabelled_subjects)


def _resolve_unit(table: pd.DataFrame, spec: EndpointSpec, values: pd.Series, empty: pd.Series) -> str:
    """``spec.unit`` with "auto" decided on the chosen rows' labels ``values`` (``empty`` [rows] bool)."""
    if spec.unit != "auto":
        return spec.unit
    if spec.task == "segmentation":
        return "subject"
    if spec.target == "sequence":
        return "volume"
    filled = ~empty.to_numpy()
    labels = pd.Series([tuple(np.atleast_1d(v)) for v in values[filled]], dtype=object)
    distinct = labels.groupby(table["subject"].to_numpy()[filled]).nunique()
    return "volume" if (distinct > 1).any() else "subject"


def _subject_samples(where, table, spec, sequences, values, empty) -> tuple:
    """One sample per subject having a label and every sequence → (samples, subjects, rows, labels, splits,
    dropped)."""
    repeated = table.duplicated(["subject", "sequence"], keep="first")
    _reject(where, repeated, "subject listed twice with one sequence",
            "keep one volume per subject and sequence (or give the rows different sequence names)")
    dropped = {}
    subjects, rows, labels, splits = [], [], [], []
    missing = unlabelled = 0
    for subject, group in table.groupby("subject", sort=True):
        labelled = group.index[~empty.loc[group.index].to_numpy()]
        if len(labelled) == 0:
            unlabelled += len(group)
            continue
        if set(group["sequence"]) != set(sequences):
            missing += len(group)
            continue
        distinct = {tuple(np.atleast_1d(v)) for v in values.loc[labelled]}
        if len(distinct) > 1:
            raise InputError(where, f"endpoint {spec.name!r}: subject {subject} has different labels in rows "
                                    f"{_rows(labelled)}", "give all rows of a subject the same label, or pass "
                                                          "--unit volume to predict each volume's own label")
        subjects.append(subject)
        rows.append(dict(zip(group["sequence"], group.index)))
        labels.append(values.loc[labelled[0]])
        splits.append(set(group["split"]))
    if unlabelled:
        dropped["empty label"] = unlabelled
    if missing:
        dropped["missing sequence"] = missing
    return list(subjects), subjects, rows, labels, splits, dropped


def _volume_samples(where, table, spec, sequences, values, empty) -> tuple:
    """One sample per labelled row, subjects in sorted order (rows in manifest order within a subject) →
    (samples, subjects, rows, labels, splits, dropped)."""
    ordered = table.sort_values("subject", kind="stable")
    repeated = ordered.duplicated(["subject", "sequence"], keep=False).to_numpy()
    samples, subjects, rows, labels, splits = [], [], [], [], []
    for (index, record), twice in zip(ordered.iterrows(), repeated):
        if empty.loc[index]:
            continue
        sequence = record["sequence"]
        tail = f"row{index + FIRST_DATA_ROW}" if twice or sequence == "" else sequence
        samples.append(f"{record['subject']}/{tail}")
        subjects.append(record["subject"])
        rows.append({sequence: index})
        labels.append(values.loc[index])
        splits.append({record["split"]})
    unlabelled = int(empty.sum())
    return samples, subjects, rows, labels, splits, {"empty label": unlabelled} if unlabelled else {}


def _labels(where, table: pd.DataFrame, spec: EndpointSpec) -> tuple[pd.Series, pd.Series]:
    """Per-row label (task-specific value, tuple for survival) and an [rows] bool 'empty' mask; bad values raise."""
    def text(column):
        raw = table[column].astype("string").fillna("").str.strip()
        return raw.mask(raw.str.lower().isin(MISSING_LABEL_TOKENS), "")
    if spec.task == "classification":
        raw = text(spec.target)
        return raw.map(_class_name), raw == ""
    if spec.task == "segmentation":
        raw = text(spec.mask)
        return raw, raw == ""
    if spec.task == "regression":
        raw = text(spec.target)
        number = pd.to_numeric(raw.where(raw != ""), errors="coerce")
        _reject(where, (raw != "") & ~np.isfinite(number.astype(float)), f"{spec.target} is not a number",
                f"regression needs numeric {spec.target} values")
        return number.astype(float), raw == ""
    time_raw, event_raw = text(spec.time), text(spec.event)
    time = pd.to_numeric(time_raw.where(time_raw != ""), errors="coerce").astype(float)
    event = pd.to_numeric(event_raw.where(event_raw != ""), errors="coerce").astype(float)
    _reject(where, (time_raw != "") & ~(time > 0), f"survival time {spec.time} is not a number > 0",
            "give times > 0 (e.g. months from diagnosis)")
    _reject(where, (event_raw != "") & ~event.isin([0.0, 1.0]), f"event {spec.event} is not 0 or 1",
            "write 1 for an observed event, 0 for censored")
    empty = (time_raw == "") | (event_raw == "")
    return pd.Series(list(zip(time, event)), index=table.index), empty


def _targets(spec: EndpointSpec, labels: list) -> tuple[dict, list[str] | None]:
    if spec.task == "classification":
        classes = sorted(set(labels), key=_class_sort_key)
        lookup = {name: code for code, name in enumerate(classes)}
        return {"code": np.array([lookup[v] for v in labels], dtype=int)}, classes
    if spec.task == "regression":
        return {"value": np.array(labels, dtype=float)}, None
    if spec.task == "survival":
        pairs = np.array(labels, dtype=float).reshape(-1, 2)
        return {"time": pairs[:, 0], "event": pairs[:, 1].astype(bool)}, None
    return {"mask": np.array(labels, dtype=object)}, None


def _class_name(value: str) -> str:
    """'1.0' and '1' name one class (a numeric column with empty cells is read as float)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() else value


def _class_sort_key(name: str):
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def _rows(index) -> str:
    return ", ".join(str(i + FIRST_DATA_ROW) for i in list(index)[:ROWS_SHOWN])


def _reject(where, bad: pd.Series, problem: str, hint: str) -> None:
    if bad.any():
        raise InputError(where, f"{problem} in row(s) {_rows(bad[bad].index)} (the header is row 1)", hint)


def mask_grid_mismatch(image_path: str, mask_path: str) -> str | None:
    """None when the mask lies on its image's voxel grid (shape and affine), else a short description."""
    import nibabel as nib

    from braindino.ingest import load_volume
    if not os.path.exists(mask_path):
        return "mask file not found"
    try:
        image, mask = nib.load(image_path), nib.load(mask_path)
        shapes = (tuple(image.shape[:3]), tuple(mask.shape[:3]))
        affines = (image.affine, mask.affine)
    except Exception:     # not NIfTI-like: read both through the ingest readers (DICOM, MHA, NRRD)
        image, mask = load_volume(image_path), load_volume(mask_path)
        shapes = (tuple(image.native_shape), tuple(mask.native_shape))
        affines = (image.native_affine, mask.native_affine)
    if shapes[0] != shapes[1]:
        return f"mask shape {shapes[1]} differs from image shape {shapes[0]}"
    if not np.allclose(affines[0], affines[1], atol=1e-3):
        return "mask affine differs from the image's"
    return None


def restrict(table: SubjectTable, available_rows: set, reason: str) -> SubjectTable:
    """The table without samples having a manifest row outside ``available_rows`` (their rows counted in
    ``dropped[reason]``)."""
    keep = np.array([set(rows.values()) <= available_rows for rows in table.rows], dtype=bool)
    if keep.all():
        return table
    dropped = dict(table.dropped)
    dropped[reason] = dropped.get(reason, 0) + sum(len(r) for r, k in zip(table.rows, keep) if not k)
    return SubjectTable(table.spec, table.sequences, table.samples[keep], table.subjects[keep],
                        [r for r, k in zip(table.rows, keep) if k], None if table.split is None else table.split[keep],
                        {k: v[keep] for k, v in table.y.items()}, table.classes, dropped, table.unlabelled_subjects)
