"""``braindino demo``: the main job end to end on the embedded synthetic cohort, on whatever machine this is.

synth (training cohort) → prepare (slice store) → pretrain (a ViT-Tiny; SimCLR by default, see CONFIG) → export
(model folder) → synth (a held-out cohort made with another seed: subjects the encoder never saw) → probe every
endpoint of that cohort by subject-grouped cross-validation against a random-init encoder of the same architecture and
the non-deep pixel baseline → (with ``--segmentation``) probe tumour segmentation → robustness of the sequence probe
to gamma, bias field and Gibbs ringing → saliency maps of a tumour probe → one report (OUT/report.md + a
self-contained OUT/report.html). Every stage writes its own folder under ``--out``; rerunning the demo skips what is
already done.
"""

import argparse
import sys
import time
from pathlib import Path

from braindino.atomic import atomic_write_text
from braindino.demo_report import write_demo_report

# A shipped config's name (braindino/configs/), so an installed wheel finds it. On the demo's budget (~8 min of 2 CPU
# cores, ~26k images) SimCLR's contrastive loss learns and DINO's does not yet leave its plateau (the README's study:
# DINO for 1,200 steps still had its loss at log K); `--config dino_vit_tiny_cpu` runs the DINO demo.
CONFIG = "simclr_vit_tiny_cpu"  # 800 steps at 0.55 s on 2 cores: ~7.5 min

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo", help="folder for the cohorts, the store, the run, the model, "
                                                      "the probe report")
    parser.add_argument("--subjects", type=int, default=16, help="training-cohort subjects (4 sequences each)")
    parser.add_argument("--heldout-subjects", type=int, default=32,
                        help="subjects of the held-out cohort the encoder is probed on (made with seed + 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=float, default=1.5,
                        help="voxel size of the synthetic volumes in mm (default 1.5: `prepare` resamples them to the "
                             "store's 1 mm grid; the 96 px encoder sees a whole slice at 2.3 mm a pixel)")
    parser.add_argument("--iters", type=int, default=None, help="pretraining steps (default: the config's)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for synth, prepare and probe")
    parser.add_argument("--config", default=CONFIG, help="pretraining config: a shipped config's name "
                                                        "(`braindino configs`) or a YAML file (default: %(default)s)")
    parser.add_argument("--fractions", default="10,100", help="probe training fractions in percent")
    parser.add_argument("--segmentation", action="store_true",
                        help="also probe tumour segmentation (a decoder on every slice's patch tokens: adds tens of "
                             "minutes on a CPU)")
    parser.add_argument("--shots", default=None, help="probe k-shot settings per class (default: the probe's 1,5, "
                                                      "on the endpoints that have classes); '' for none")
    parser.add_argument("--seeds", default="0,1,2", help="probe seeds")
    parser.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for CIs and paired tests")
    parser.add_argument("--slice-stride", type=int, default=4,
                        help="probe on every K-th axial slice of the held-out volumes (default 4: 6 mm apart at "
                             "1.5 mm)")


def run(args: argparse.Namespace) -> int:
    from braindino.cli import main as braindino

    out = Path(args.out)
    if args.iters is None:
        from braindino.errors import InputError
        from braindino.train.config import load_config

        try:
            args.iters = int(load_config(args.config).optim.iters)
        except (InputError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    cohort, store, run_dir, model = out / "cohort", out / "store", out / "run", out / "model"
    heldout, probe_dir = out / "heldout", out / "probe"
    segmentation_dir, robustness_dir, saliency_dir = out / "probe_segmentation", out / "robustness", out / "saliency"
    clock = StageClock()

    def unless_done(result: Path, *inputs: Path):
        """Skip a stage whose result exists and is newer than every input it was made from."""
        def decide(stage):
            def run_stage() -> int:
                if result.exists() and all(result.stat().st_mtime >= i.stat().st_mtime for i in inputs):
                    print(f"  {result} is up to date: kept")
                    return 0
                return stage()
            return run_stage
        return decide

    def synth(folder: Path, subjects: int, seed: int) -> int:
        if (folder / "manifest.csv").exists():
            print(f"  {folder}/manifest.csv exists: kept")
            return 0
        return braindino(["synth", "--out", str(folder), "--subjects", str(subjects), "--seed", str(seed),
                          "--resolution", str(args.resolution), "--workers", str(args.workers)])

    def pretrain() -> int:
        train_args = ["train", "--config", args.config, "--data", str(store), "--out", str(run_dir),
                      f"optim.iters={args.iters}", f"seed={args.seed}", "train.knn_label=sequence",
                      f"train.knn_every={max(args.iters // 3, 1)}"]
        return braindino(train_args + (["--resume"] if (run_dir / "checkpoints").exists() else []))

    def probe() -> int:
        endpoints = out / "endpoints.yaml"
        atomic_write_text(endpoints, ENDPOINTS_YAML)
        return braindino(["probe", "--model", str(model), "--manifest", str(heldout / "manifest.csv"),
                          "--endpoints", str(endpoints), "--protocol", "cv", "--skip-infeasible",
                          "--fractions", args.fractions, *(["--shots", args.shots] if args.shots is not None else []),
                          "--slice-stride", str(args.slice_stride),
                          "--seeds", args.seeds, "--bootstrap", str(args.bootstrap), "--workers",
                          str(args.workers), "--out", str(probe_dir)])

    def probe_segmentation() -> int:
        """Tumour masks from frozen patch tokens, on the held-out subjects that have one (FLAIR, every slice)."""
        import pandas as pd

        manifest = pd.read_csv(heldout / "manifest.csv")
        with_masks = manifest[manifest["mask"].notna()]
        tumour_manifest = heldout / "manifest_tumour.csv"
        atomic_write_text(tumour_manifest, with_masks.to_csv(index=False))
        return braindino(["probe", "--model", str(model), "--manifest", str(tumour_manifest), "--task",
                          "segmentation", "--mask", "mask", "--sequences", "FLAIR", "--protocol", "cv",
                          "--folds", "3", "--fractions", "100", "--shots", "", "--seeds", "0", "--bootstrap",
                          str(args.bootstrap), "--workers", str(args.workers), "--out", str(segmentation_dir)])

    def robustness() -> int:
        grid = ["--grid", "gamma=0.6,1.6", "--grid", "bias_field=0.3", "--grid", "gibbs=0.3"]
        return braindino(["robustness", "--model", str(model), "--manifest", str(heldout / "manifest.csv"),
                          "--task", "classification", "--target", "sequence", "--protocol", "split",
                          "--perturbations", "gamma,bias_field,gibbs", *grid,
                          "--slice-stride", str(args.slice_stride), "--features", str(probe_dir / "features"),
                          "--bootstrap", str(args.bootstrap), "--workers", str(args.workers),
                          "--out", str(robustness_dir)])

    def saliency() -> int:
        """Maps of a tumour-vs-rest probe for the first two held-out tumour subjects' FLAIR volumes; the head trains
        on the probe's features of the model (same slices), so nothing is embedded twice."""
        import pandas as pd

        manifest = pd.read_csv(heldout / "manifest.csv")
        tumours = manifest[(manifest["diagnosis"] == "tumour") & (manifest["sequence"] == "FLAIR")
                           & (manifest["split"] == "test")].head(2)
        images = [argument for path in tumours["path"] for argument in ("--image", str(heldout / path))]
        return braindino(["saliency", "--model", str(model), "--manifest", str(heldout / "manifest.csv"), *images,
                          "--task", "classification", "--target", "diagnosis", "--class", "tumour",
                          "--sequence", "FLAIR", "--pooling", "mean", "--workers", str(args.workers),
                          "--slice-stride", str(args.slice_stride), "--features", str(probe_dir / "features" / "model"),
                          "--out", str(saliency_dir)])

    stages = [
        ("synth", f"synthesising {args.subjects} training subjects into {cohort}",
         lambda: synth(cohort, args.subjects, args.seed)),
        ("prepare", f"preparing the slice store {store}",
         lambda: braindino(["prepare", "--manifest", str(cohort / "manifest.csv"), "--out", str(store),
                            "--workers", str(args.workers)])),
        ("pretrain", f"pretraining ({Path(args.config).name}, {args.iters} steps) into {run_dir}", pretrain),
        ("export", f"exporting the teacher to {model}",
         unless_done(model / "config.json", run_dir / "checkpoints")(
             lambda: braindino(["export", "--checkpoint", str(run_dir), "--out", str(model)]))),
        ("held-out synth", f"synthesising {args.heldout_subjects} held-out subjects (seed {args.seed + 1}) into "
                           f"{heldout}", lambda: synth(heldout, args.heldout_subjects, args.seed + 1)),
        ("probe", f"probing the held-out cohort's endpoints (pretrained vs random init vs pixels) into "
                  f"{probe_dir}", unless_done(probe_dir / "metrics.json", model / "config.json")(probe)),
        ("robustness", f"robustness of the sequence probe to gamma, bias field and Gibbs ringing into "
                       f"{robustness_dir}", unless_done(robustness_dir / "metrics.json", model / "config.json")(
                           robustness)),
        ("saliency", f"saliency maps of a tumour probe on two held-out tumour subjects into {saliency_dir}",
         unless_done(saliency_dir / "saliency.csv", model / "config.json")(saliency)),
    ]
    if args.segmentation:   # opt-in: the decoder trains on every slice of every fold, far beyond the 15 minutes
        stages.insert(6, ("segmentation", f"probing tumour segmentation on the held-out tumour subjects into "
                                          f"{segmentation_dir}", unless_done(segmentation_dir / "metrics.json",
                                                                             model / "config.json")(probe_segmentation)))
    for number, (name, title, stage) in enumerate(stages, 1):
        print(f"[{number}/{len(stages)}] {title}", flush=True)
        status = clock.time(name, stage)
        if status:
            return status
    summary = demo_summary(run_dir, probe_dir, clock)
    report = write_demo_report(out, heldout_comparison(probe_dir), clock.line())
    print(summary)
    print(f"  one report: {report} and {report.with_suffix('.html')}")
    return 0


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
    """One line per endpoint: the headline metric of each encoder at the largest training fraction, and whether
    the pretrained encoder beat each baseline there (paired bootstrap)."""
    import json

    from braindino.probe.results import ProbeResults

    path = probe_dir / "metrics.json"
    if not path.exists():
        return []
    results = ProbeResults.from_dict(json.loads(path.read_text(encoding="utf-8")))
    lines = ["  held-out cohort, largest training fraction (mean over seeds [95% CI of the first seed]):"]
    for endpoint in results.endpoints:
        fractions = [s for s in endpoint.scores if s.kind == "fraction"]
        if not fractions:
            continue
        setting = max(fractions, key=lambda s: s.amount).setting
        parts = []
        for encoder in results.encoders:
            try:
                aggregate = endpoint.aggregate(encoder.name, setting, endpoint.headline)
                value = endpoint.score(encoder.name, setting, results.seeds[0]).metrics[endpoint.headline]
            except KeyError:
                continue
            parts.append(f"{encoder.name if encoder.role == 'baseline' else 'pretrained'} {aggregate.mean:.3f} "
                         f"[{_fmt(value.low)}, {_fmt(value.high)}]")
        verdicts = [_verdict(c, endpoint.higher_is_better[endpoint.headline]) for c in endpoint.comparisons
                    if c.setting == setting]
        lines.append(f"    {endpoint.name} ({endpoint.headline}, {setting}): " + "; ".join(parts)
                     + (" — " + ", ".join(verdicts) if verdicts else ""))
    return lines


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _verdict(comparison, higher_is_better: bool) -> str:
    better = comparison.difference > 0 if higher_is_better else comparison.difference < 0
    if comparison.p_value is None or not comparison.p_value < 0.05:
        return f"no significant difference vs {comparison.baseline} (p={_fmt(comparison.p_value)})"
    return f"{'better' if better else 'worse'} than {comparison.baseline} (p={comparison.p_value:.3f})"
