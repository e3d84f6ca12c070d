"""The segmentation endpoint: a patch-token decoder per (encoder, setting, seed), Dice vs the true masks, and the
predicted masks written as NIfTI in each input's native voxel grid (with its affine).

Training targets are the true masks put through the image's own slicing (``label_slices_from_mask``: reorientation,
in-plane resample (nearest), crop), so decoder inputs ``patch`` [S, N, D] and targets [S, size, size] line up
slice for slice. Prediction: decoder output [S, size, size] → canonical volume (``slices_to_canonical``; slices
the preprocessing dropped are background) → Dice per foreground label against the true mask (canonical grid; a
reorientation does not change Dice) → native grid (``canonical_to_native``) → ``RUN/masks/...nii.gz``.
Masks are written for the largest setting only (e.g. 100 %); smaller settings report Dice alone.
"""

import os

import nibabel as nib
import numpy as np

from braindino.atomic import atomic_path
from braindino.errors import InputError
from braindino.ingest import load_volume
from braindino.probe import metrics as M
from braindino.probe.compare import INTERVALS, aggregate, compare, fold_values, held_out_ratio
from braindino.probe.evaluate import BOOTSTRAP_SEED, cell_flags, plan_folds
from braindino.probe.results import EndpointResult, MetricValue, Score

MASKS_DIR = "masks"


class MaskSource:
    """True masks of a segmentation endpoint: ``labels`` (sorted foreground labels over all subjects),
    ``canonical(i)`` → [X, Y, Z] int (RAS canonical grid), ``slices(i, geometry, z)`` → [S, size, size] int
    targets (cached per subject and geometry)."""

    def __init__(self, table):
        self.paths = list(table.y["mask"])
        self.cache = {}
        labels = set()
        for path in self.paths:
            data = self.canonical_path(path)
            labels |= set(np.unique(data).tolist())
        if any(label < 0 for label in labels):
            raise InputError(self.paths[0], "mask has negative labels", "use labels 0 (background), 1, 2, ...")
        self.labels = sorted(int(label) for label in labels if label > 0)
        if not self.labels:
            raise InputError(self.paths[0], "no mask has a foreground label", "label the structures with 1, 2, ...")

    @staticmethod
    def canonical_path(path) -> np.ndarray:
        data = load_volume(path).data
        rounded = np.rint(data)
        if not np.allclose(data, rounded):
            raise InputError(path, "mask holds non-integer values", "save the segmentation as integer labels")
        return rounded.astype(np.int32)

    def canonical(self, i: int) -> np.ndarray:
        return self.canonical_path(self.paths[i])

    def slices(self, i: int, geometry: dict, z: np.ndarray) -> np.ndarray:
        from braindino.ingest.geometry import label_slices_from_mask

        key = (i, tuple(np.asarray(geometry["affine"]).ravel()), tuple(np.asarray(z).tolist()))
        if key not in self.cache:
            self.cache[key] = label_slices_from_mask(load_volume(self.paths[i]), geometry, z).astype(np.int64)
        return self.cache[key]


def evaluate_segmentation(table, plan, encoders: list[dict], seeds: list[int], n_bootstrap: int,
                          confidence: float, run_dir, progress) -> tuple[EndpointResult, list[dict]]:
    """Every cell of a segmentation endpoint → (EndpointResult, cell outputs for predictions.csv).

    encoders: [{"name", "slug", "parameters", "features", "rows": [n] features positions, "grid", "slice_size"}].
    """
    masks = MaskSource(table)
    metric_names = M.metric_names("segmentation", masks.labels)
    result = EndpointResult(
        name=table.spec.name, task="segmentation", target=None, time=None, event=None, mask=table.spec.mask,
        sequences=table.sequences, fusion=table.spec.fusion, pooling="patch", head="segmentation-decoder",
        protocol="cv" if table.split is None else "split", folds=plan_folds(plan),
        n_subjects=len(table.subjects), dropped=dict(table.dropped), classes=None, metrics=metric_names,
        headline="dice_mean", higher_is_better={m: True for m in metric_names},
        settings=[s.name for s in plan.settings], notes=list(plan.notes),
        mask_dir=os.path.join(MASKS_DIR, table.spec.name), n_samples=len(table.samples),
        intervals=dict(INTERVALS["cv" if table.split is None else "split"]))
    largest = max(plan.settings, key=lambda s: (s.kind == "fraction", s.amount))     # its masks are written
    rows, by_cell = [], {}
    for encoder in encoders:
        for setting in plan.settings:
            for seed in seeds:
                out_dir = (os.path.join(run_dir, result.mask_dir, encoder["slug"], f"seed-{seed}")
                           if setting == largest else None)
                output = _run_cell(table, masks, encoder, plan.folds[seed], plan.subsets[(setting.name, seed)],
                                   seed, out_dir, run_dir)
                draws = M.bootstrap_indices(len(output["pred"]["dice"]), n_bootstrap, BOOTSTRAP_SEED)
                scores = M.score_with_ci("segmentation", output["pred"], draws, confidence)
                total = output["head_parameters"] + encoder["parameters"]
                result.scores.append(Score(
                    encoder=encoder["name"], setting=setting.name, kind=setting.kind, amount=setting.amount,
                    seed=seed, n_train=output["n_train"], n_test=len(output["positions"]),
                    metrics={m: MetricValue(*scores[m]) for m in metric_names},
                    head_parameters=output["head_parameters"],
                    fraction_trained=output["head_parameters"] / total if total else 1.0,
                    fold_metrics=fold_values("segmentation", output["pred"], output["fold_names"], metric_names),
                    test_train_ratio=held_out_ratio(plan.folds[seed], plan.subsets[(setting.name, seed)],
                                                    table.subjects),
                    flags=cell_flags("segmentation", output["pred"], table.subjects[output["positions"]],
                                     table.subjects, plan.subsets[(setting.name, seed)])))
                rows.append({"encoder": encoder["name"], "setting": setting, "seed": seed, **output})
                by_cell[(encoder["name"], setting.name, seed)] = output["pred"]
                progress.update(1)
    groups = table.subjects[rows[0]["positions"]] if rows else table.subjects
    draws = M.cluster_bootstrap_indices(groups, n_bootstrap, BOOTSTRAP_SEED) if result.protocol == "split" else None
    result.aggregates = aggregate(result, [e["name"] for e in encoders], seeds, by_cell, draws, confidence)
    result.comparisons = compare("segmentation", result, encoders, seeds, by_cell, groups, n_bootstrap, confidence, 1,
                                 BOOTSTRAP_SEED + 1)
    return result, rows


def _load(encoder: dict, i: int) -> dict:
    loaded = encoder["features"].load(encoder["rows"][i])
    if "patch" not in loaded:
        raise InputError(encoder["features"].root, "features hold no patch tokens",
                         "extract them with --patch-tokens (segmentation decodes patch tokens)")
    return loaded


def _run_cell(table, masks: MaskSource, encoder: dict, folds, subsets, seed: int, out_dir, run_dir) -> dict:
    """Fit the decoder per fold, predict its test subjects → dict(pred {"dice" [m, L], "labels"}, positions [m],
    fold_names [m], mask_files [m] (relative to run_dir, "" when not written), head_parameters, n_train)."""
    from heads import SegmentationDecoder
    from braindino.ingest.geometry import canonical_to_native, slices_to_canonical

    dice, positions, names, files, sizes, n_head = [], [], [], [], [], 0
    n_classes = masks.labels[-1] + 1
    for fold, train in zip(folds, subsets):
        patches, targets = [], []
        for i in train:
            loaded = _load(encoder, i)
            patches.append(loaded["patch"].astype(np.float32))
            targets.append(masks.slices(i, loaded["geometry"], loaded["z"]))
        decoder = SegmentationDecoder(n_classes, tuple(encoder["grid"]), encoder["slice_size"], random_state=seed)
        decoder.fit(np.concatenate(patches), np.concatenate(targets))
        n_head = int(sum(p.numel() for p in decoder.network_.parameters()))
        for i in fold.test:
            loaded = _load(encoder, i)
            predicted = decoder.predict(loaded["patch"].astype(np.float32))
            canonical = slices_to_canonical(predicted, loaded["z"], loaded["geometry"])
            dice.append(M.dice_per_label(masks.canonical(i), canonical, masks.labels))
            files.append(_write_mask(canonical_to_native(canonical, loaded["geometry"]), loaded["geometry"],
                                     out_dir, table.subjects[i], run_dir) if out_dir else "")
            positions.append(i)
            names.append(fold.name)
        sizes.append(len(train))
    order = np.argsort(positions, kind="stable")
    return {"pred": {"dice": np.array(dice)[order], "labels": np.array(masks.labels)},
            "positions": np.array(positions)[order], "fold_names": np.array(names)[order],
            "mask_files": np.array(files)[order], "head_parameters": n_head, "n_train": float(np.mean(sizes))}


def _write_mask(native: np.ndarray, geometry: dict, out_dir: str, subject: str, run_dir) -> str:
    """Atomically save an [X, Y, Z] native-grid label map with the input's native affine; path relative to run."""
    path = os.path.join(out_dir, f"{_safe(subject)}.nii.gz")
    image = nib.Nifti1Image(native.astype(np.int16), np.asarray(geometry["native_affine"], dtype=float))
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp) + ".nii.gz")
        os.replace(str(tmp) + ".nii.gz", tmp)
    return os.path.relpath(path, run_dir)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
