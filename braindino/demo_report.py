"""The demo's one report: ``OUT/report.md`` and a self-contained ``OUT/report.html`` from the stages' own reports.

It opens with where pretraining helped and where it did not (the probe report's per-endpoint verdicts), then takes
in the probe report, the segmentation probe, the robustness tables and curves and the saliency montages, each
with its headings one level down and its figure links rewritten to point into the stage's folder.
"""

import re
from pathlib import Path

from braindino.atomic import atomic_write_text
from braindino.probe.report import write_html

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


def write_demo_report(out: Path, heldout_line: list[str], timing: str) -> Path:
    """Write ``out/report.md`` and ``out/report.html``; ``heldout_line``: the console's held-out comparison."""
    probe, segmentation = out / "probe" / "report.md", out / "probe_segmentation" / "report.md"
    robustness, saliency = out / "robustness" / "robustness.md", out / "saliency"
    lines = ["# braindino demo report", "",
             "A ViT pretrained on a synthetic training cohort, frozen, and probed on subjects it never saw (a cohort "
             "made with another seed), against a random-init encoder of the same architecture (`random_like`) and "
             "the non-deep pixel baseline (`pixels`), on the same subject-grouped splits.", "", f"Timing: {timing}.", "",
             "## Where pretraining helped, and where it did not", ""]
    if probe.is_file():
        verdicts = summary_paragraphs(probe)
        beat_random = sum("better (p=" in v.split("Against pixels")[0] for v in verdicts)
        beat_pixels = sum("better (p=" in v.split("Against pixels")[-1] for v in verdicts if "Against pixels" in v)
        lines += [f"In plain words: the pretrained encoder beat random init on {beat_random} of {len(verdicts)} "
                  f"endpoints and the pixel baseline on {beat_pixels} of {len(verdicts)}, at one or more training "
                  "sizes (paired subject bootstrap, p < 0.05); on every other endpoint it did not. Per endpoint, at "
                  "the largest training fraction:", ""]
        lines += [*(f"- {line.strip()}" for line in heldout_line[1:]), "", *verdicts, ""]
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
