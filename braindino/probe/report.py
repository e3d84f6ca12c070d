"""A probe run's human-readable report: ``RUN/report.md``, ``RUN/figures/*.png`` and a self-contained
``RUN/report.html``, written from the :class:`~braindino.probe.results.ProbeResults` tree and ``RUN/predictions.csv``.

``report.md``: the run (command, seeds, encoders); a summary in plain words per endpoint (did the model under test
beat each baseline, by the paired test with Holm-adjusted p-values, at the smallest and the largest training
fraction; if it beat none, that there is no significant evidence pretraining helped; fine-tuned rows compared with
the frozen probe); then per endpoint a scores table (encoders × settings; per metric the first seed's value with
its bootstrap CI and the mean ± std over seeds; n_train, n_test, fraction of parameters trained), the comparisons
table, dropped rows, notes and the figures (relative links). Per-subject figures (ROC, confusion matrix,
predicted-vs-true, Kaplan–Meier, mask overlay) show the model under test at the largest fraction, first seed.
"""

import base64
import html
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from braindino.atomic import atomic_write_text
from braindino.errors import InputError
from braindino.probe import figures
from braindino.probe.formatting import format_p, number, signed, verdict_text
from braindino.probe.results import EndpointResult, ProbeResults

FIGURES_DIR = "figures"


def write_report(run_dir, results: ProbeResults) -> Path:
    """Write ``run_dir/report.md``, its figures and ``run_dir/report.html``; returns the path of report.md."""
    run_dir = Path(run_dir)
    predictions = _read_predictions(run_dir / results.predictions)
    lines = [f"# Probe report: {results.model}", "", *_run_lines(results), "## Summary", ""]
    for endpoint in results.endpoints:
        lines += [_summary(endpoint, results), ""]
    for endpoint in results.endpoints:
        lines += _endpoint_lines(run_dir, endpoint, results, predictions)
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    write_html(run_dir)
    return path


def _read_predictions(path: Path) -> pd.DataFrame:
    """predictions.csv with every cell as text (class labels stay exactly as written; numbers converted on use)."""
    if not path.is_file():
        raise InputError(path, "predictions file not found", "write predictions.csv before the report")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _run_lines(results: ProbeResults) -> list[str]:
    lines = [f"Command: `{results.command}`", "",
             f"Seeds: {', '.join(map(str, results.seeds))}; {results.n_bootstrap} bootstrap resamples of subjects; "
             f"{results.confidence:.0%} confidence intervals; {results.elapsed_s:g} s.", "",
             "| encoder | role | spec | parameters | fingerprint |", "|---|---|---|---|---|"]
    lines += [f"| {e.name} | {e.role} | {e.spec} | {e.parameters:,} | {e.fingerprint} |" for e in results.encoders]
    return lines + [""]


def _fraction_settings(endpoint: EndpointResult) -> list[str]:
    """The smallest and the largest training fraction (one if equal); all settings' ends if none is a fraction."""
    amounts = {s.setting: s.amount for s in endpoint.scores if s.kind == "fraction"}
    ordered = sorted(amounts, key=amounts.get) or endpoint.settings
    return list(dict.fromkeys([ordered[0], ordered[-1]])) if ordered else []


def _summary(endpoint: EndpointResult, results: ProbeResults) -> str:
    """One paragraph: per baseline, the model's verdict at the smallest and largest fraction, then the bottom line."""
    metric = endpoint.headline
    higher = endpoint.higher_is_better[metric]
    alpha = 1 - results.confidence
    scored = {s.encoder for s in endpoint.scores}
    baselines = [e.name for e in results.encoders if e.role == "baseline" and e.name in scored]
    finetuned = [e.name for e in results.encoders if e.role == "finetune" and e.name in scored]
    methods = sorted({c.method for c in endpoint.comparisons}) or ["paired subject bootstrap"]
    adjusted = any(c.p_holm is not None for c in endpoint.comparisons)
    text = (f"**{endpoint.name}** ({endpoint.task}; headline {metric}, {'higher' if higher else 'lower'} values "
            f"are good): {results.model} vs each baseline by the {' / '.join(methods)} at α = {alpha:.2g}"
            + (", Holm-adjusted over the endpoint's comparisons." if adjusted else "."))
    if not baselines:
        return text + " No baseline was run, so this run cannot say whether pretraining helped."
    found = {(c.setting, c.baseline): c for c in endpoint.comparisons}
    fingerprints = {e.name: e.fingerprint for e in results.encoders}
    twins = [b for b in baselines if fingerprints[b] == fingerprints[results.model]]
    if twins:
        text += (f" Note: {', '.join(twins)} has the same fingerprint as {results.model} (identical weights and "
                 "preprocessing), so that comparison cannot show an effect of pretraining.")
    verdicts = []
    for baseline in baselines:
        parts = []
        for setting in _fraction_settings(endpoint):
            comparison = found.get((setting, baseline))
            verdict = verdict_text(comparison, higher, alpha)
            if comparison is not None and comparison.p_value is not None:
                verdict += f", difference {signed(comparison.difference)}"
            parts.append(f"at {setting} {verdict}")
            verdicts.append(verdict)
        text += f" Against {baseline}: " + "; ".join(parts) + "."
    for name in finetuned:
        parts = []
        for setting in _fraction_settings(endpoint):
            comparison = found.get((setting, name))
            verdict = verdict_text(comparison, higher, alpha)
            if comparison is not None and comparison.p_value is not None:
                verdict += f", difference {signed(comparison.difference)}"
            parts.append(f"at {setting} {verdict}")
        text += f" Frozen probe against {name} (fine-tuned): " + "; ".join(parts) + "."
    if not any(v.startswith("better") for v in verdicts):
        text += (" No significant evidence that pretraining helped on this endpoint: the model beat no baseline at "
                 "these training sizes.")
    elif all(v.startswith("better") for v in verdicts):
        text += " The model beat every baseline at these training sizes."
    if any(v.startswith("worse") for v in verdicts):
        text += " At least one baseline was significantly better than the model."
    return text


def _sample_count(endpoint: EndpointResult) -> str:
    """"40 subjects", or "120 volumes of 40 subjects (one sample per volume)" where the counts differ."""
    if endpoint.n_samples == endpoint.n_subjects:
        return f"{endpoint.n_subjects} subjects"
    return f"{endpoint.n_samples} {endpoint.unit}s of {endpoint.n_subjects} subjects (one sample per {endpoint.unit})"


def _endpoint_lines(run_dir: Path, endpoint: EndpointResult, results: ProbeResults,
                    predictions: pd.DataFrame) -> list[str]:
    """The endpoint's section: description, scores, comparisons, dropped rows, notes and figures."""
    label = {"survival": f"time {endpoint.time}, event {endpoint.event}",
             "segmentation": f"mask {endpoint.mask}"}.get(endpoint.task, f"target {endpoint.target}")
    protocol = endpoint.protocol + (f" ({endpoint.folds} folds)" if endpoint.folds else "")
    classes = f"; classes {', '.join(endpoint.classes)}" if endpoint.classes else ""
    lines = [f"## {endpoint.name}", "",
             f"{endpoint.task}: {label}; sequences {', '.join(endpoint.sequences)} ({endpoint.fusion}); pooling "
             f"{endpoint.pooling}; head {endpoint.head}; protocol {protocol}; {_sample_count(endpoint)}{classes}.",
             "", "### Scores", "", *_scores_table(endpoint, results), "", "### Comparisons", ""]
    lines += _comparisons_table(endpoint, results) if endpoint.comparisons else ["No comparisons (no baseline)."]
    lines += ["", "### Dropped rows", ""]
    lines += [f"- {reason}: {n}" for reason, n in endpoint.dropped.items()] or ["None."]
    lines += ["", "### Notes", ""]
    lines += [f"- {note}" for note in endpoint.notes] or ["None."]
    drawn, missing = _endpoint_figures(run_dir, endpoint, results, predictions)
    lines += ["", "### Figures", ""]
    for caption, path in drawn:
        lines += [f"![{caption}]({path.relative_to(run_dir).as_posix()})", ""]
    lines += [f"- {reason}" for reason in missing]
    return lines + [""]


def _scores_table(endpoint: EndpointResult, results: ProbeResults) -> list[str]:
    """Rows = encoders × settings (those run); per metric the first seed's value [CI] and mean ± std over seeds."""
    level = f"{results.confidence:.0%}"
    header = ["encoder", "setting", "n_train", "n_test", "params trained"]
    for metric in endpoint.metrics:
        header += [f"{metric} (seed {results.seeds[0]}) [{level} CI]", f"{metric} mean ± std"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    encoders = [e.name for e in results.encoders if any(s.encoder == e.name for s in endpoint.scores)]
    for encoder in encoders:
        for setting in endpoint.settings:
            runs = [s for s in endpoint.scores if (s.encoder, s.setting) == (encoder, setting)]
            if not runs:
                continue
            score = next((s for s in runs if s.seed == results.seeds[0]), runs[0])
            cells = [encoder, setting, f"{score.n_train:g}", str(score.n_test), f"{100 * score.fraction_trained:.3g}%"]
            for metric in endpoint.metrics:
                value = score.metrics[metric]
                shown = format_p(value.value) if metric.endswith("_p") else number(value.value)
                if value.low is not None and value.high is not None:
                    shown += f" [{number(value.low)}, {number(value.high)}]"
                cells += [shown, _mean_std(endpoint, encoder, setting, metric, len(results.seeds))]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mean_std(endpoint: EndpointResult, encoder: str, setting: str, metric: str, n_seeds: int) -> str:
    """"mean ± std" over seeds, with "(n=k)" when fewer seeds than run had a defined value."""
    try:
        item = endpoint.aggregate(encoder, setting, metric)
    except KeyError:
        return "n/a"
    text = f"{number(item.mean)} ± {number(item.std)}"
    return text + (f" (n={item.n_seeds})" if item.n_seeds != n_seeds else "")


def _comparisons_table(endpoint: EndpointResult, results: ProbeResults) -> list[str]:
    level = f"{results.confidence:.0%}"
    lines = [f"| setting | model | baseline | metric | difference (model − baseline) [{level} CI] | p | p (Holm) | "
             "subjects | resamples | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in endpoint.comparisons:
        verdict = verdict_text(c, endpoint.higher_is_better[c.metric], 1 - results.confidence)
        lines.append(f"| {c.setting} | {c.model} | {c.baseline} | {c.metric} | {signed(c.difference)} "
                     f"[{signed(c.low)}, {signed(c.high)}] | {format_p(c.p_value)} | {format_p(c.p_holm)} | {c.n_subjects} | "
                     f"{c.n_resamples} | {verdict.split(' (')[0]} |")
    return lines


def _endpoint_figures(run_dir: Path, endpoint: EndpointResult, results: ProbeResults,
                      predictions: pd.DataFrame) -> tuple[list[tuple[str, Path]], list[str]]:
    """Draw the endpoint's figures; returns ([(caption, png path)], [why a figure is missing])."""
    out = run_dir / FIGURES_DIR
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", endpoint.name)
    metric = endpoint.headline
    curve = curve_table(endpoint, results)
    drawn, missing = [], []
    if (curve["kind"] == "fraction").any():
        drawn.append((f"{endpoint.name}: learning curve ({metric})",
                      figures.learning_curve(curve, metric, out / f"{stem}-learning-curve.png",
                                             f"{endpoint.name}: {metric} vs training data")))
    shots = curve[curve["kind"] == "shot"]
    if len(shots):
        drawn.append((f"{endpoint.name}: few-shot {metric}",
                      figures.few_shot_bars(shots.rename(columns={"label": "setting"}), metric,
                                            out / f"{stem}-few-shot.png", f"{endpoint.name}: few-shot {metric}")))
    setting = _fraction_settings(endpoint)[-1]
    seed = results.seeds[0]
    rows = predictions[(predictions["endpoint"] == endpoint.name) & (predictions["encoder"] == results.model)
                       & (predictions["setting"] == setting) & (predictions["seed"] == str(seed))]
    where = f"{results.model}, {setting}, seed {seed}"
    if not len(rows):
        return drawn, [f"No per-subject figures: predictions.csv has no rows for {where}."]
    if endpoint.task == "classification":
        probabilities = rows[[f"prob_{c}" for c in endpoint.classes]].astype(float)
        probabilities.columns = endpoint.classes
        drawn.append((f"{endpoint.name}: ROC ({where})", figures.roc_curves(
            rows["y_true"], probabilities, out / f"{stem}-roc.png", f"{endpoint.name}: ROC ({where})")))
        drawn.append((f"{endpoint.name}: confusion matrix ({where})", figures.confusion_matrix(
            rows["y_true"], rows["y_pred"], endpoint.classes, out / f"{stem}-confusion.png",
            f"{endpoint.name}: confusion matrix\n({where})")))
    elif endpoint.task == "regression":
        drawn.append((f"{endpoint.name}: predicted vs true ({where})", figures.predicted_vs_true(
            rows["y_true"].astype(float), rows["y_pred"].astype(float), out / f"{stem}-predicted-vs-true.png",
            endpoint.target or "target", f"{endpoint.name}: predicted vs true ({where})")))
    elif endpoint.task == "survival":
        p_value = endpoint.score(results.model, setting, seed).metrics["logrank_p"].value
        drawn.append((f"{endpoint.name}: Kaplan–Meier by risk group ({where})", figures.kaplan_meier(
            rows["time"].astype(float), rows["event"].astype(float).astype(bool), rows["risk_group"], p_value,
            out / f"{stem}-kaplan-meier.png", f"{endpoint.name} ({where})")))
    else:
        overlay = _overlay(run_dir, endpoint, results, rows, out / f"{stem}-mask-overlay.png", where)
        (drawn if isinstance(overlay, tuple) else missing).append(overlay)
    return drawn, missing


def curve_table(endpoint: EndpointResult, results: ProbeResults) -> pd.DataFrame:
    """Learning-curve rows (encoder, kind, percent, label, mean, std) of the headline metric. A shot setting is
    placed at the share of the full training set it used: mean n_train / (n_train at the largest fraction ÷ that
    fraction)."""
    rows = []
    for encoder in [e.name for e in results.encoders]:
        scores = [s for s in endpoint.scores if s.encoder == encoder]
        fractions = [s for s in scores if s.kind == "fraction"]
        largest = max(fractions, key=lambda s: s.amount) if fractions else None
        for setting in endpoint.settings:
            runs = [s for s in scores if s.setting == setting]
            if not runs or (runs[0].kind == "shot" and largest is None):
                continue
            n_train = sum(s.n_train for s in runs) / len(runs)
            percent = runs[0].amount if runs[0].kind == "fraction" else n_train * largest.amount / largest.n_train
            item = endpoint.aggregate(encoder, setting, endpoint.headline)
            rows.append(dict(encoder=encoder, kind=runs[0].kind, percent=percent, label=setting,
                             mean=_float(item.mean), std=_float(item.std)))
    return pd.DataFrame(rows, columns=["encoder", "kind", "percent", "label", "mean", "std"])


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _overlay(run_dir: Path, endpoint: EndpointResult, results: ProbeResults, rows: pd.DataFrame, path: Path,
             where: str) -> tuple[str, Path] | str:
    """The first non-empty predicted mask of ``rows`` over its image (found in the model's features index.csv by
    subject and the endpoint's first sequence); a reason string when there is no mask or image to draw."""
    written = [(subject, run_dir / mask) for subject, mask in zip(rows["subject"], rows["mask"]) if mask]
    if not written:
        return f"No mask overlay: no predicted mask was written for {where}."
    drawable = [(subject, mask) for subject, mask in written if np.asarray(nib.load(mask).dataobj).any()]
    if not drawable:
        return f"No mask overlay: every predicted mask of {where} is empty (no foreground voxel)."
    subject, mask = drawable[0]
    features = Path(next(e.features for e in results.encoders if e.name == results.model)) / "index.csv"
    if not features.is_file():
        return f"No mask overlay: {features} not found (the image of {subject} is looked up there)."
    index = pd.read_csv(features, dtype=str, keep_default_na=False)
    index = index[index["subject"] == subject]
    if "sequence" in index and endpoint.sequences:
        index = index[index["sequence"] == endpoint.sequences[0]]
    if not len(index):
        return f"No mask overlay: subject {subject} is not in {features}."
    caption = f"{endpoint.name}: predicted mask of {subject} ({where})"
    return caption, figures.segmentation_overlay(index["path"].iloc[0], mask, path, caption)


def write_html(run_dir) -> Path:
    """Convert ``run_dir/report.md`` to a self-contained ``run_dir/report.html`` (figures inlined as base64 PNG data
    URIs); returns its path."""
    run_dir = Path(run_dir)
    source = run_dir / "report.md"
    if not source.is_file():
        raise InputError(source, "report.md not found", "run write_report (probe.py) first")
    body = "\n".join(_markdown_to_html(source.read_text(encoding="utf-8"), run_dir))
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Probe report</title><style>"
            "body{font-family:sans-serif;max-width:80em;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
            "th,td{border:1px solid #bbb;padding:.25em .5em;text-align:left}th{background:#eee}"
            "img{max-width:100%}figcaption{font-size:90%;color:#444}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path


def _markdown_to_html(text: str, run_dir: Path) -> list[str]:
    """The small markdown subset report.md uses: headings, paragraphs, "- " lists, pipe tables (first row the
    header, second the separator), images alone on a line (inlined), inline `code` and **bold**."""
    out, block, kind = [], [], None

    def flush():
        if kind == "p":
            out.append(f"<p>{' '.join(_inline(line) for line in block)}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in block) + "</ul>")
        elif kind == "table":
            rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in block]
            head = "".join(f"<th>{_inline(cell)}</th>" for cell in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>" for row in rows[2:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        block.clear()

    for line in text.splitlines():
        image = re.fullmatch(r"!\[(.*)\]\((.+)\)", line.strip())
        heading = re.match(r"(#{1,6}) (.*)", line)
        line_kind = ("table" if line.startswith("|") else "ul" if line.startswith("- ") else
                     None if not line.strip() or image or heading else "p")
        if line_kind != kind:
            flush()
            kind = line_kind
        if heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif image:
            alt, source = html.escape(image.group(1)), _data_uri(run_dir / image.group(2))
            out.append(f"<figure><img alt=\"{alt}\" src=\"{source}\">"
                       f"<figcaption>{_inline(image.group(1))}</figcaption></figure>")
        elif line_kind:
            block.append(line)
    flush()
    return out


def _inline(text: str) -> str:
    """HTML-escape, then `code` → <code>, **bold** → <strong>."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _data_uri(path: Path) -> str:
    if not path.is_file():
        raise InputError(path, "figure linked from report.md not found", "rerun write_report to redraw the figures")
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
