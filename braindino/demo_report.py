"""The demo's one report: ``OUT/report.md`` and a self-contained ``OUT/report.html`` from the stages' own reports.

It opens with where pretraining helped and where it did not (per baseline, random init, pixels and the CNN trained
from scratch, the endpoints where the pretrained encoder was significantly better after Holm's adjustment over the
run; then the probe report's per-endpoint verdicts), then takes
in the probe report, the segmentation probe, the robustness tables and curves and the saliency montages, each
with its headings one level down and its figure links rewritten to point into the stage's folder.
"""

import json
import re
from pathlib import Path

from braindino.atomic import atomic_write_text
from braindino.probe.report import write_html
from braindino.probe.results import ProbeResults

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


def summary_paragraphs(probe_report: Path) -> list[str]:
    """The per-endpoint verdict paragraphs of the probe report's ``## Summary``."""
    lines = probe_report.read_text(encoding="utf-8").splitlines()
    start = lines.index("## Summary") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return [line for line in lines[start:end] if line.strip()]


BASELINE_WORDS = {"random_like": "random init", "pixels": "the pixel baseline",
                  "scratch": "the CNN trained from scratch"}


def headline_wins(results, alpha: float = 0.05) -> dict[str, tuple[int, int]]:
    """{baseline: (endpoints where the model was significantly better than it, endpoints compared)} at the
    headline settings (each endpoint's smallest and largest training fraction), on the p-values Holm-adjusted over
    the run's headline comparisons (``p_holm_run``; metrics.json written before it existed: ``p_holm``, then
    ``p_value``). Fine-tuned rows are not baselines and are not counted."""
    from braindino.probe.compare import headline_settings, verdict

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


def write_demo_report(out: Path, heldout_line: list[str], timing: str) -> Path:
    """Write ``out/report.md`` and ``out/report.html``; ``heldout_line``: the console's held-out comparison."""
    probe, segmentation = out / "probe" / "report.md", out / "probe_segmentation" / "report.md"
    robustness, saliency = out / "robustness" / "robustness.md", out / "saliency"
    lines = ["# braindino demo report", "",
             "A ViT pretrained on a synthetic training cohort, frozen, and probed on subjects it never saw (a cohort "
             "made with another seed), against a random-init encoder of the same architecture (`random_like`), "
             "the non-deep pixel baseline (`pixels`) and a small CNN trained from scratch on each training set's "
             "labels (`scratch`, where the probe ran it), on the same subject-grouped splits.", "",
             f"Timing: {timing}.", "", "## Where pretraining helped, and where it did not", ""]
    metrics = out / "probe" / "metrics.json"
    if probe.is_file() and metrics.is_file():
        results = ProbeResults.from_dict(json.loads(metrics.read_text(encoding="utf-8")))
        lines += [plain_words(results), ""]
        lines += [*(f"- {line.strip()}" for line in heldout_line[1:]), "", *summary_paragraphs(probe), ""]
    for title, report in (("Probing the held-out cohort", probe), ("Tumour segmentation", segmentation),
                          ("Robustness to acquisition changes", robustness)):
        if report.is_file():
            lines += [f"## {title}", "", *stage_body(report, out), ""]
    montages = sorted(saliency.glob("*/montage.png"))
    if montages:
        lines += ["## Saliency", "", "Maps of the pretrained encoder on held-out tumour subjects, written as NIfTI in "
                  "each input's own voxel grid (`saliency/<volume>/*.nii.gz`); the montages show them over the "
                  "anatomy.", ""]
        lines += [f"![saliency of {m.parent.name}]({m.relative_to(out).as_posix()})" for m in montages]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    write_html(out)
    return path
