"""The demo's one report: ``OUT/report.md`` and a self-contained ``OUT/report.html``, drawn from the probe's
results object (``probe/metrics.json``) and the stages' own reports.

A reader skims it top down: first one table (endpoint × encoder: the headline metric at the largest training
fraction with its interval, the best in bold, a mark where the pretrained encoder differs significantly from that
encoder after Holm's adjustment over the run), then a forest plot of model − baseline differences per endpoint and
setting, then the learning curves, then the verdict in one short paragraph. After that come the stages' full
reports (probe, segmentation, robustness, saliency), headings one level down and figure links pointing into the
stage's folder.
"""

import json
import re
from pathlib import Path

import pandas as pd

from braindino.atomic import atomic_write_text
from braindino.probe import figures
from braindino.probe.compare import headline_settings, verdict
from braindino.probe.formatting import interval, number
from braindino.probe.report import curve_table, write_html
from braindino.probe.results import EndpointResult, ProbeResults

FIGURES_DIR = "figures"
MARKS = {"better": "▲", "worse": "▼"}

_IMAGE = re.compile(r"!\[(.*)\]\((.+)\)")


def stage_body(report: Path, root: Path) -> list[str]:
    """``report``'s lines after its title, headings demoted one level, figure links made relative to ``root``."""
    prefix = report.parent.relative_to(root)
    lines = report.read_text(encoding="utf-8").splitlines()
    body = lines[1:] if lines and lines[0].startswith("# ") else lines
    out = []
    for line in body:
        image = _IMAGE.fullmatch(line.strip())
        if image:
            line = f"![{image.group(1)}]({(prefix / image.group(2)).as_posix()})"
        elif line.startswith("#"):
            line = "#" + line
        out.append(line)
    return out


BASELINE_WORDS = {"random_like": "random init", "pixels": "the pixel baseline",
                  "scratch": "the CNN trained from scratch"}


def headline_wins(results, alpha: float = 0.05) -> dict[str, tuple[int, int]]:
    """{baseline: (endpoints where the model was significantly better than it, endpoints compared)} at the
    headline settings (each endpoint's smallest and largest training fraction), on the p-values Holm-adjusted over
    the run's headline comparisons (``p_holm_run``; metrics.json written before it existed: ``p_holm``, then
    ``p_value``). Fine-tuned rows are not baselines and are not counted."""
    baselines = [e.name for e in results.encoders if e.role == "baseline"]
    wins = {name: [0, 0] for name in baselines}
    for endpoint in results.endpoints:
        higher = endpoint.higher_is_better[endpoint.headline]
        settings = headline_settings(endpoint)
        for name in baselines:
            found = [c for c in endpoint.comparisons if c.baseline == name and c.setting in settings]
            if not found:
                continue
            wins[name][1] += 1
            wins[name][0] += any(verdict(c, higher, alpha, over_run=True) == "better" for c in found)
    return {name: (won, compared) for name, (won, compared) in wins.items()}


def plain_words(results, alpha: float = 0.05) -> str:
    """The demo report's opening sentence: per baseline, on how many endpoints the pretrained encoder beat it."""
    wins = headline_wins(results, alpha)
    parts = [f"{BASELINE_WORDS.get(name, name)} on {won} of {compared} endpoints" for name, (won, compared)
             in wins.items() if compared]
    listed = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] if parts else "no baseline"
    return (f"In plain words: the pretrained encoder beat {listed}, at the smallest or the largest training fraction "
            f"(p < {alpha:g} after Holm's adjustment over every endpoint's headline comparisons); on every other "
            "endpoint there is no significant evidence that it did. Per endpoint, at the largest training fraction:")


def plain_words(results, alpha: float = 0.05) -> str:
    """The verdict in one paragraph: per baseline, on how many endpoints the pretrained encoder beat it, and which."""
    wins = headline_wins(results, alpha)
    parts = [f"{BASELINE_WORDS.get(name, name)} on {won} of {compared} endpoints" for name, (won, compared)
             in wins.items() if compared]
    listed = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] if parts else "no baseline"
    text = (f"In plain words: the pretrained encoder beat {listed}, at the smallest or the largest training fraction "
            f"(p < {alpha:g} after Holm's adjustment over every endpoint's headline comparisons); on every other "
            "endpoint there is no significant evidence that it did.")
    won = _won_endpoints(results, alpha)
    if won:
        text += " Wins: " + "; ".join(f"{name} (over {', '.join(over)})" for name, over in won.items()) + "."
    return text


def _won_endpoints(results, alpha: float) -> dict[str, list[str]]:
    """{endpoint: [baselines the model beat there at a headline setting, run-wide Holm]} (endpoints with a win)."""
    baselines = {e.name for e in results.encoders if e.role == "baseline"}
    won = {}
    for endpoint in results.endpoints:
        higher = endpoint.higher_is_better[endpoint.headline]
        over = [c.baseline for c in endpoint.comparisons if c.baseline in baselines
                and c.setting in headline_settings(endpoint) and verdict(c, higher, alpha, over_run=True) == "better"]
        if over:
            won[endpoint.name] = list(dict.fromkeys(over))
    return won


def largest_fraction(endpoint: EndpointResult) -> str | None:
    """The setting of the endpoint's largest training fraction; None when no fraction was run."""
    fractions = [s for s in endpoint.scores if s.kind == "fraction"]
    return max(fractions, key=lambda s: s.amount).setting if fractions else None


def glance_table(results: ProbeResults, alpha: float = 0.05) -> list[str]:
    """Markdown lines: one row per endpoint, one column per encoder; each cell the headline metric at the largest
    training fraction (mean over seeds and the interval of that mean), the best mean in bold, ▲ / ▼ where the
    pretrained encoder is significantly better / worse than that column's encoder there (run-wide Holm)."""
    names = [e.name for e in results.encoders]
    shown = ["pretrained" if e.role == "model" else e.name for e in results.encoders]
    lines = ["| endpoint | metric (setting) | " + " | ".join(shown) + " |", "|---|---|" + "---|" * len(names)]
    for endpoint in results.endpoints:
        setting = largest_fraction(endpoint)
        if setting is None:
            continue
        metric, higher = endpoint.headline, endpoint.higher_is_better[endpoint.headline]
        means = {}
        for name in names:
            try:
                means[name] = endpoint.aggregate(name, setting, metric)
            except KeyError:
                continue
        finite = [m.mean for m in means.values() if m.mean is not None and pd.notna(m.mean)]
        best = (max if higher else min)(finite) if finite else None
        marks = {c.baseline: MARKS.get(verdict(c, higher, alpha, over_run=True), "")
                 for c in endpoint.comparisons if c.setting == setting}
        cells = []
        for name in names:
            item = means.get(name)
            if item is None:
                cells.append("not run")
                continue
            value = number(item.mean)
            value = f"**{value}**" if best is not None and item.mean == best else value
            cells.append(f"{value} {interval(item.low, item.high)}{(' ' + marks[name]) if marks.get(name) else ''}")
        lines.append(f"| {endpoint.name} | {metric} ({'higher' if higher else 'lower'} is better; {setting}) | "
                     + " | ".join(cells) + " |")
    return lines


def forest_rows(results: ProbeResults, alpha: float = 0.05) -> pd.DataFrame:
    """Every fraction-setting comparison of the model with a baseline: the rows of
    :func:`braindino.probe.figures.forest_plot` (significant: the verdict on the run-wide Holm p where the setting
    has one, else the endpoint's)."""
    baselines = {e.name for e in results.encoders if e.role == "baseline"}
    rows = []
    for endpoint in results.endpoints:
        kinds = {s.setting: s.kind for s in endpoint.scores}
        higher = endpoint.higher_is_better[endpoint.headline]
        for c in endpoint.comparisons:
            if c.metric != endpoint.headline or c.baseline not in baselines or kinds.get(c.setting) != "fraction":
                continue
            rows.append(dict(endpoint=endpoint.name, metric=c.metric, higher_is_better=higher,
                             label=f"{c.baseline}, {c.setting}", difference=_float(c.difference), low=_float(c.low),
                             high=_float(c.high),
                             significant=verdict(c, higher, alpha, over_run=True) in ("better", "worse")))
    return pd.DataFrame(rows, columns=["endpoint", "metric", "higher_is_better", "label", "difference", "low", "high",
                                       "significant"])


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def glance_lines(out: Path, results: ProbeResults, alpha: float = 0.05) -> list[str]:
    """The report's first section: the table, its legend, the forest plot and the learning curves (drawn into
    ``out/figures``)."""
    lines = ["## Results at a glance", "",
             "Held-out subjects, largest training fraction: each encoder's headline metric, mean over seeds "
             "[95 % interval of that mean]; the best in **bold**; ▲ / ▼: the pretrained encoder is significantly "
             f"better / worse than that column's encoder (p < {alpha:g}, Holm over the run's headline comparisons).",
             "", *glance_table(results, alpha), ""]
    differences = forest_rows(results, alpha)
    if len(differences) and differences["difference"].notna().any():
        path = figures.forest_plot(differences, out / FIGURES_DIR / "forest.png")
        lines += ["![forest plot: pretrained − baseline per endpoint and training fraction, 95 % CIs (filled: "
                  f"significant after Holm)]({path.relative_to(out).as_posix()})", ""]
    curves = [(f"{e.name} ({e.headline})", curve_table(e, results), e.headline) for e in results.endpoints]
    curves = [(title, curve, metric) for title, curve, metric in curves if (curve["kind"] == "fraction").any()]
    if curves:
        path = figures.learning_curves(curves, out / FIGURES_DIR / "learning-curves.png")
        lines += [f"![learning curves: headline metric vs training data]({path.relative_to(out).as_posix()})", ""]
    return lines


def write_demo_report(out: Path, timing: str) -> Path:
    """Write ``out/report.md`` and ``out/report.html`` from ``out/probe/metrics.json`` and the stages' reports."""
    probe, segmentation = out / "probe" / "report.md", out / "probe_segmentation" / "report.md"
    robustness, saliency = out / "robustness" / "robustness.md", out / "saliency"
    lines = ["# braindino demo report", "",
             "A ViT pretrained on a synthetic training cohort, frozen, and probed on subjects it never saw (a cohort "
             "made with another seed), against a random-init encoder of the same architecture (`random_like`), "
             "the non-deep pixel baseline (`pixels`) and a small CNN trained from scratch on each training set's "
             "labels (`scratch`, where the probe ran it), on the same subject-grouped splits.", "",
             f"Timing: {timing}.", ""]
    metrics = out / "probe" / "metrics.json"
    if probe.is_file() and metrics.is_file():
        results = ProbeResults.from_dict(json.loads(metrics.read_text(encoding="utf-8")))
        alpha = 1 - results.confidence
        lines += glance_lines(out, results, alpha)
        lines += ["## Where pretraining helped, and where it did not", "", plain_words(results, alpha), ""]
    for title, report in (("Probing the held-out cohort", probe), ("Tumour segmentation", segmentation),
                          ("Robustness to acquisition changes", robustness)):
        if report.is_file():
            lines += [f"## {title}", "", *stage_body(report, out), ""]
    montages = sorted(saliency.glob("*/montage.png"))
    if montages:
        lines += ["## Saliency", "", "Maps of the pretrained encoder on held-out tumour subjects, written as NIfTI in "
                  "each input's own voxel grid (`saliency/<volume>/*.nii.gz`); the montages cut through the lesion "
                  "(the manifest's mask, outlined in cyan) or, without a mask, through the map's maximum.", ""]
        lines += [f"![saliency of {m.parent.name}]({m.relative_to(out).as_posix()})" for m in montages]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    write_html(out)
    return path
