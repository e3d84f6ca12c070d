"""Probe-report figures: one function per figure, each taking plain data and a PNG path, writing the PNG atomically
and returning the path.

Figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot state, no GUI backend needed) and saved with
``format="png"`` because :func:`braindino.atomic.atomic_path` hands out a ``.tmp`` name.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from braindino.atomic import atomic_path

DPI = 110


def _save(figure: Figure, path) -> Path:
    """Write ``figure`` as PNG to ``path`` atomically; returns ``Path(path)``."""
    path = Path(path)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def learning_curve(curve: pd.DataFrame, metric: str, path, title: str = "") -> Path:
    """Headline metric vs training size, one line per encoder, mean ± std band over seeds.

    ``curve`` rows: encoder, kind ("fraction" | "shot"), percent (training fraction in %, for a shot setting the
    share of the full training set it used), label (setting name), mean, std. Fractions are joined by a line with a
    shaded ±std band on a log x axis; shot settings are separate hollow markers annotated with their label. The
    first encoder (the model under test) is drawn on top, so a baseline with equal scores cannot hide it.
    """
    figure = Figure(figsize=(6.4, 4.2))
    _draw_learning_curve(figure.add_subplot(), curve, metric, title or f"Learning curve: {metric}")
    return _save(figure, path)


def learning_curves(curves: list[tuple[str, pd.DataFrame, str]], path, columns: int = 3) -> Path:
    """Small multiples of :func:`learning_curve`: one panel per (title, curve, metric), ``columns`` per row."""
    rows = -(-len(curves) // columns)
    figure = Figure(figsize=(4.2 * min(columns, len(curves)), 3.4 * rows))
    for i, (title, curve, metric) in enumerate(curves):
        _draw_learning_curve(figure.add_subplot(rows, min(columns, len(curves)), i + 1), curve, metric, title)
    return _save(figure, path)


def _draw_learning_curve(ax, curve: pd.DataFrame, metric: str, title: str) -> None:
    """:func:`learning_curve`'s drawing on ``ax``."""
    colours = {}
    groups = list(curve.groupby("encoder", sort=False))
    for i, (encoder, rows) in enumerate(groups):
        line = rows[rows["kind"] == "fraction"].sort_values("percent")
        mean, std = line["mean"].to_numpy(float), np.nan_to_num(line["std"].to_numpy(float))
        drawn = ax.plot(line["percent"], mean, marker="o", label=encoder, zorder=3 + len(groups) - i)[0]
        ax.fill_between(line["percent"], mean - std, mean + std, color=drawn.get_color(), alpha=0.2)
        colours[encoder] = drawn.get_color()
        shots = rows[rows["kind"] == "shot"]
        ax.errorbar(shots["percent"], shots["mean"], yerr=np.nan_to_num(shots["std"].to_numpy(float)), fmt="D",
                    mfc="none", color=colours[encoder], capsize=3)
        for _, shot in shots.iterrows():
            ax.annotate(shot["label"], (shot["percent"], shot["mean"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=colours[encoder])
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(curve.loc[curve["kind"] == "fraction", "percent"])))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}%"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training data (% of training subjects; ◇ = few-shot)")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def forest_plot(differences: pd.DataFrame, path, title: str = "") -> Path:
    """Model − baseline differences with their CIs, one panel per endpoint (each on its metric's own scale).

    ``differences`` rows: endpoint, metric, higher_is_better (bool), label (e.g. "pixels, 100%"), difference, low,
    high, significant (bool: after the multiplicity correction). A row is a horizontal CI with its point estimate,
    filled when significant, hollow otherwise; the dashed line is no difference, and each panel's x label says which
    side the model is better on. Rows with an undefined difference are left out.
    """
    shown = differences[np.isfinite(differences["difference"].to_numpy(float))]
    endpoints = list(dict.fromkeys(shown["endpoint"]))
    heights = [max(1, (shown["endpoint"] == e).sum()) for e in endpoints] or [1]
    figure = Figure(figsize=(7.0, 0.9 + 0.32 * sum(heights) + 0.55 * len(heights)))
    axes = figure.subplots(len(heights), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)[:, 0]
    for ax, endpoint in zip(axes, endpoints):
        rows = shown[shown["endpoint"] == endpoint].reset_index(drop=True)
        y = np.arange(len(rows))[::-1]
        estimate = rows["difference"].to_numpy(float)
        low = np.nan_to_num(estimate - rows["low"].to_numpy(float), nan=0.0)
        high = np.nan_to_num(rows["high"].to_numpy(float) - estimate, nan=0.0)
        ax.errorbar(estimate, y, xerr=[np.maximum(low, 0), np.maximum(high, 0)], fmt="none", ecolor="#555",
                    capsize=3)
        significant = rows["significant"].to_numpy(bool)
        ax.scatter(estimate[significant], y[significant], color="#c0392b", zorder=3, label="significant")
        ax.scatter(estimate[~significant], y[~significant], facecolors="white", edgecolors="#555", zorder=3)
        ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
        ax.set_yticks(y, rows["label"], fontsize=8)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        better = "right" if bool(rows["higher_is_better"].iloc[0]) else "left"
        ax.set_title(endpoint, fontsize=9, loc="left")
        ax.set_xlabel(f"model − baseline, {rows['metric'].iloc[0]} (model better to the {better})", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def few_shot_bars(bars: pd.DataFrame, metric: str, path, title: str = "") -> Path:
    """Grouped bars of the metric per few-shot setting (groups) and encoder (bars), with ±std error bars.

    ``bars`` rows: encoder, setting, mean, std; settings keep their first-seen order.
    """
    settings = list(dict.fromkeys(bars["setting"]))
    encoders = list(dict.fromkeys(bars["encoder"]))
    width = 0.8 / len(encoders)
    figure = Figure(figsize=(1.6 + 1.2 * len(settings) * max(1, len(encoders) / 2), 4.0))
    ax = figure.add_subplot()
    for i, encoder in enumerate(encoders):
        rows = bars[bars["encoder"] == encoder].set_index("setting").reindex(settings)
        ax.bar(np.arange(len(settings)) + (i - (len(encoders) - 1) / 2) * width, rows["mean"], width,
               yerr=np.nan_to_num(rows["std"].to_numpy(float)), capsize=3, label=encoder)
    ax.set_xticks(np.arange(len(settings)), settings)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(title or f"Few-shot: {metric}")
    ax.legend(fontsize=8)
    return _save(figure, path)


def roc_curves(y_true, probabilities: pd.DataFrame, path, title: str = "") -> Path:
    """One-vs-rest ROC curve per class (``sklearn.metrics.roc_curve``) with its AUC in the legend.

    ``y_true`` [n] class labels (str); ``probabilities`` [n, C] with one column per class, named by the class. With
    two classes only the second (positive) class is drawn; a class absent from (or the only one in) ``y_true`` is
    skipped since its curve is undefined.
    """
    from sklearn.metrics import auc, roc_curve

    y_true = np.asarray(y_true).astype(str)
    classes = list(probabilities.columns)
    figure = Figure(figsize=(4.8, 4.6))
    ax = figure.add_subplot()
    for name in classes[1:] if len(classes) == 2 else classes:
        positive = y_true == str(name)
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probabilities[name].to_numpy(float))
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC (one-vs-rest)")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower right")
    return _save(figure, path)


def confusion_matrix(y_true, y_pred, labels: list[str], path, title: str = "") -> Path:
    """Confusion matrix (rows true, columns predicted) drawn by ``sklearn.metrics.ConfusionMatrixDisplay``."""
    from sklearn.metrics import ConfusionMatrixDisplay

    figure = Figure(figsize=(1.8 + 0.9 * len(labels), 1.4 + 0.9 * len(labels)))
    ax = figure.add_subplot()
    ConfusionMatrixDisplay.from_predictions(np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str),
                                            labels=[str(label) for label in labels], ax=ax, colorbar=False)
    ax.set_title(title or "Confusion matrix")
    return _save(figure, path)


def predicted_vs_true(y_true, y_pred, path, target: str = "target", title: str = "") -> Path:
    """Scatter of predicted vs true values [n] with the identity line y = x over their common range."""
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    figure = Figure(figsize=(4.8, 4.6))
    ax = figure.add_subplot()
    ax.scatter(y_true, y_pred, s=14, alpha=0.7)
    finite = np.concatenate([y_true, y_pred])
    finite = finite[np.isfinite(finite)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="identity")
    ax.set_xlabel(f"true {target}")
    ax.set_ylabel(f"predicted {target}")
    ax.set_title(title or f"Predicted vs true {target}")
    ax.legend(fontsize=8)
    return _save(figure, path)


def kaplan_meier(time, event, group, p_value: float | None, path, title: str = "") -> Path:
    """Kaplan–Meier survival curves (``sksurv.nonparametric.kaplan_meier_estimator``) per risk group.

    ``time`` [n] float, ``event`` [n] bool, ``group`` [n] str (e.g. "high" / "low"); ``p_value`` is the log-rank
    p shown in the title (None or NaN: "n/a").
    """
    from sksurv.nonparametric import kaplan_meier_estimator

    time, event, group = np.asarray(time, float), np.asarray(event, bool), np.asarray(group).astype(str)
    figure = Figure(figsize=(5.6, 4.2))
    ax = figure.add_subplot()
    for name in sorted(set(group)):
        chosen = group == name
        steps, survival = kaplan_meier_estimator(event[chosen], time[chosen])
        ax.step(np.concatenate([[0.0], steps]), np.concatenate([[1.0], survival]), where="post",
                label=f"{name} risk (n={int(chosen.sum())}, events={int(event[chosen].sum())})")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    shown = "n/a" if p_value is None or not np.isfinite(p_value) else f"{p_value:.3g}"
    ax.set_title(f"{title or 'Kaplan–Meier by risk group'} (log-rank p = {shown})")
    ax.legend(fontsize=8)
    return _save(figure, path)


def segmentation_overlay(image_path, mask_path, path, title: str = "") -> Path:
    """The predicted label mask (NIfTI) drawn over its image (NIfTI) with ``nilearn.plotting.plot_roi``, three
    orthogonal cuts through the mask's centre of mass."""
    from nilearn import image, plotting

    figure = Figure(figsize=(8.0, 3.2), facecolor="black")
    mask = image.load_img(str(mask_path))
    plotting.plot_roi(mask, bg_img=image.load_img(str(image_path)), figure=figure, title=title or None,
                      display_mode="ortho", colorbar=False, draw_cross=False, black_bg=True,
                      cut_coords=_centre_of_mass(np.asarray(mask.dataobj), mask.affine))
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, facecolor="black")
    return Path(path)


def _centre_of_mass(labels: np.ndarray, affine: np.ndarray) -> tuple[float, float, float] | None:
    """World (mm) coordinates of the centre of the foreground voxels of ``labels`` [X, Y, Z]; None if empty."""
    voxels = np.argwhere(labels > 0)
    if not len(voxels):
        return None
    centre = affine @ np.append(voxels.mean(axis=0), 1.0)
    return tuple(float(v) for v in centre[:3])
