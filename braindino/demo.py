"""``braindino demo``: the main job end to end on the embedded synthetic cohort, on whatever machine this is.

synth (training cohort) → prepare (slice store) → pretrain (a ViT-Tiny self-distilled with DINO + iBOT + KoLeo, see CONFIG) → export
(model folder) → synth (a held-out cohort made with another seed: subjects the encoder never saw) → probe every
endpoint of that cohort by subject-grouped cross-validation against a random-init encoder of the same architecture,
the non-deep pixel baseline and a small CNN trained from scratch on each training set (SCRATCH_ARGS) → (with ``--segmentation``) probe tumour segmentation → robustness of the sequence probe
to gamma, bias field and Gibbs ringing → saliency maps of a tumour probe → one report (OUT/report.md + a
self-contained OUT/report.html). Every stage writes its own folder under ``--out``; rerunning the demo skips what is
already done. The stages run through the ``braindino`` commands (:mod:`braindino.cli.demo`); this module holds
what the demo is made of: the pretraining config, the held-out endpoints, the stage clock and the summaries.
"""

import time
from pathlib import Path

# A shipped config's name (braindino/configs/), so an installed wheel finds it: the short-run DINO recipe that leaves
# the uniform-target fixed point (README, "Why DINO sat at log K"). `--config simclr_vit_tiny_cpu` runs the
# comparison recipe (BrainIAC's SimCLR) on the same budget.
CONFIG = "dino_vit_tiny_cpu"  # 500 steps at ~0.85 s on 2 cores: ~7 min

# The held-out cohort's endpoints (columns of `braindino synth`'s manifest). Focal findings (tumour, stroke) live in
# a few slices, so those endpoints pool slices by their maximum; global ones (sequence, age) by the mean. Survival
# averages its two sequences' features (fusion: mean) instead of concatenating them: the penalised Cox fit costs
# the square of the feature count per sample, and concatenation made it most of the probe's time.
ENDPOINTS_YAML = """\
- {name: sequence, task: classification, target: sequence, pooling: mean}
- {name: diagnosis, task: classification, target: diagnosis, sequences: [T1w, FLAIR], pooling: meanmax}
- {name: age, task: regression, target: age, sequences: [T1w], pooling: mean}
- {name: mutation, task: classification, target: mutation, sequences: [T1c, FLAIR], pooling: max}
- {name: survival, task: survival, time: time, event: event, sequences: [T1c, FLAIR], fusion: mean, pooling: max}
- {name: months_since_stroke, task: regression, target: months_since_stroke, sequences: [FLAIR], pooling: max}
"""


# The supervised-from-scratch baseline of the held-out probe, sized for the demo's budget: a 24.5k-parameter CNN on
# 32 px slices, 4 slices per volume, at most 15 epochs per training set (early-stopped). It trains once per endpoint,
# setting, seed and fold (~240 small fits on the demo's cohort: about a minute of the 2 cores, the slices tapped
# from the probe's own feature extraction). Fine-tuning the ViT per fold (`--finetune last:1`) costs tens of minutes
# on a CPU, so the demo leaves it out unless asked.
SCRATCH_ARGS = ["--baseline", "scratch", "--epochs", "15", "--max-slices", "4", "--scratch-size", "32"]


class StageClock:
    """Wall time of each stage, for the summary."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: list[tuple[str, float]] = []

    def time(self, name: str, stage) -> int:
        begin = time.perf_counter()
        status = stage()
        self.seconds.append((name, time.perf_counter() - begin))
        return status

    def line(self) -> str:
        total = time.perf_counter() - self.started
        return f"demo finished in {total:.0f}s (" + ", ".join(f"{n} {s:.0f}s" for n, s in self.seconds) + ")"


def demo_summary(run_dir: Path, probe_dir: Path, clock: StageClock) -> str:
    """Pretraining monitors at the start and end, then the held-out comparison per endpoint."""
    from braindino.train.metrics_log import read_metrics

    records = read_metrics(run_dir)
    monitored = [r for r in records if "monitor/effective_rank" in r]
    losses = [r["loss/total"] for r in records if "loss/total" in r]
    lines = [clock.line(), f"  run: {run_dir}; report: {probe_dir / 'report.md'} and report.html"]
    if losses:
        lines.append(f"  loss (total): {losses[0]:.4f} at the first log -> {losses[-1]:.4f} at the last")
    if monitored:
        first, last = monitored[0], monitored[-1]
        for key in ("effective_rank", "feature_std", "student_teacher_kl"):
            if f"monitor/{key}" in last:
                lines.append(f"  {key}: {first[f'monitor/{key}']:.4f} at step {first['step'] + 1} -> "
                             f"{last[f'monitor/{key}']:.4f} at step {last['step'] + 1}")
    knn = [r for r in records if "monitor/knn_accuracy" in r]
    initial = [r["monitor/knn_accuracy_init"] for r in records if "monitor/knn_accuracy_init" in r]
    if knn and initial:
        lines.append(f"  kNN accuracy of the MRI sequence on held-out volumes: {initial[0]:.3f} with random weights "
                     f"-> {knn[-1]['monitor/knn_accuracy']:.3f} after pretraining")
    lines.extend(heldout_comparison(probe_dir))
    return "\n".join(lines)


def heldout_comparison(probe_dir: Path) -> list[str]:
    """One line per endpoint: the headline metric of each encoder at the largest training fraction (seed mean and
    the 95 % interval of that mean), and whether the pretrained encoder beat each baseline there (the probe's paired
    test, Holm-adjusted)."""
    import json

    from braindino.probe.formatting import interval
    from braindino.probe.results import ProbeResults

    path = probe_dir / "metrics.json"
    if not path.exists():
        return []
    results = ProbeResults.from_dict(json.loads(path.read_text(encoding="utf-8")))
    lines = ["  held-out cohort, largest training fraction (mean over seeds [95% interval of the mean]):"]
    for endpoint in results.endpoints:
        fractions = [s for s in endpoint.scores if s.kind == "fraction"]
        if not fractions:
            continue
        setting = max(fractions, key=lambda s: s.amount).setting
        parts = []
        for encoder in results.encoders:
            try:
                aggregate = endpoint.aggregate(encoder.name, setting, endpoint.headline)
            except KeyError:
                continue
            parts.append(f"{'pretrained' if encoder.role == 'model' else encoder.name} {aggregate.mean:.3f} "
                         f"{interval(aggregate.low, aggregate.high)}")
        verdicts = [_verdict(c, endpoint.higher_is_better[endpoint.headline], 1 - results.confidence)
                    for c in endpoint.comparisons
                    if c.setting == setting]
        lines.append(f"    {endpoint.name} ({endpoint.headline}, {setting}): " + "; ".join(parts)
                     + (" — " + ", ".join(verdicts) if verdicts else ""))
    return lines


def _verdict(comparison, higher_is_better: bool, alpha: float) -> str:
    """The probe's verdict (:func:`braindino.probe.compare.verdict`, Holm-adjusted over the endpoint) with its p:
    "better than pixels (p=0.004, Holm 0.012)", "no significant difference vs pixels (…)"."""
    from braindino.probe.compare import verdict
    from braindino.probe.formatting import p_text

    judged = verdict(comparison, higher_is_better, alpha)
    return f"{judged} {'vs' if judged.startswith(('no', 'not')) else 'than'} {comparison.baseline} ({p_text(comparison)})"
