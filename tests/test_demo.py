"""`braindino demo`, the README's main command, end to end on a small, coarse synthetic cohort."""

import json
import math

import pandas as pd

from braindino.cli import main
from braindino.probe.results import ProbeResults
from braindino.train.metrics_log import read_metrics

SHRUNK = ["--subjects", "3", "--heldout-subjects", "8", "--iters", "6", "--resolution", "3", "--workers", "1",
          "--fractions", "100", "--seeds", "0", "--bootstrap", "20"]


def test_demo_runs_every_stage_and_summarises(tmp_path, capsys):
    demo = tmp_path / "demo"
    status = main(["demo", "--out", str(demo), *SHRUNK])
    out = capsys.readouterr().out
    assert status == 0, out
    assert (demo / "cohort" / "manifest.csv").exists() and (demo / "store" / "store.json").exists()
    summary = json.loads((demo / "run" / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps_run"] == 6 and summary["objective"] == "dino"
    config = json.loads((demo / "model" / "config.json").read_text(encoding="utf-8"))
    assert config["braindino"]["provenance"]["objective"] == "dino" and (demo / "model" / "model.safetensors").exists()
    results = ProbeResults.from_dict(json.loads((demo / "probe" / "metrics.json").read_text(encoding="utf-8")))
    assert [e.name for e in results.encoders] == ["model", "random_like", "pixels", "scratch"]
    assert [e.role for e in results.encoders] == ["model", "baseline", "baseline", "baseline"]
    assert results.command.startswith("braindino probe --model ")          # the probe's own command, not the demo's
    endpoints = {e.name: e for e in results.endpoints}
    assert {"sequence", "age"} <= set(endpoints)
    assert endpoints["sequence"].unit == "volume" and endpoints["sequence"].protocol == "cv"
    assert endpoints["age"].n_subjects == 8
    html = (demo / "probe" / "report.html").read_text(encoding="utf-8")
    assert "<table" in html and "data:image/png;base64," in html
    assert "demo finished" in out and "effective_rank" in out and "held-out cohort" in out
    assert "sequence (balanced_accuracy, 100%): pretrained" in out
    check_numbers(demo, results, out)
    # robustness of the sequence probe: clean features taken from the probe run, 3 perturbations × 3 encoders
    table = pd.read_csv(demo / "robustness" / "robustness.csv")
    assert set(table["encoder"]) == {"model", "random_like", "pixels"}
    assert set(table["perturbation"]) == {"gamma", "bias_field", "gibbs"}
    assert not (demo / "robustness" / "features").exists()
    for name in ("gamma", "bias_field", "gibbs"):
        assert (demo / "robustness" / "figures" / f"robustness_{name}.png").stat().st_size > 1000
    # saliency: NIfTI maps on each mapped volume's own grid, and a montage; its head trained on the probe's features
    mapped = pd.read_csv(demo / "saliency" / "saliency.csv")
    assert len(mapped) >= 1
    assert not (demo / "saliency" / "features").exists()
    for volume in mapped["name"]:
        assert (demo / "saliency" / volume / "montage.png").stat().st_size > 1000
        assert list((demo / "saliency" / volume).glob("*.nii.gz"))
    # one report: the plain-words opening, every stage's section, every figure inlined in the HTML
    report = (demo / "report.md").read_text(encoding="utf-8")
    for heading in ("## Where pretraining helped, and where it did not", "## Probing the held-out cohort",
                    "## Robustness to acquisition changes", "## Saliency"):
        assert heading in report
    assert "In plain words: the pretrained encoder beat random init on" in report
    demo_html = (demo / "report.html").read_text(encoding="utf-8")
    assert demo_html.count("data:image/png;base64,") == report.count("![")

    # running it again skips every finished stage: their outputs are left exactly as they were
    # (store: the slice shards; a no-op prepare still rewrites store.json and the index as a new generation)
    finished = {p: (p.stat().st_mtime_ns, p.read_bytes()) for folder in ("cohort", "store/shards", "run/checkpoints",
                                                                      "heldout")
                for p in (demo / folder).rglob("*") if p.is_file()}
    finished[demo / "run" / "metrics.jsonl"] = ((demo / "run" / "metrics.jsonl").stat().st_mtime_ns,
                                                (demo / "run" / "metrics.jsonl").read_bytes())
    model = (demo / "model" / "model.safetensors").read_bytes()
    assert len(finished) > 20
    assert main(["demo", "--out", str(demo), *SHRUNK]) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("manifest.csv exists: kept") == 2                      # both synth stages
    assert "0 volumes stored, 12 unchanged, 0 failed" in rerun                 # prepare
    assert "already holds all 6 steps: nothing to train" in rerun              # pretrain resumes at its last step
    assert rerun.count("is up to date: kept") == 4                            # export, probe, robustness, saliency
    changed = [str(p) for p, (mtime, content) in finished.items()
               if not p.exists() or p.stat().st_mtime_ns != mtime or p.read_bytes() != content]
    assert changed == []
    assert (demo / "model" / "model.safetensors").read_bytes() == model      # export writes the same model again
    again = ProbeResults.from_dict(json.loads((demo / "probe" / "metrics.json").read_text(encoding="utf-8")))
    assert summary_lines(rerun)[2:] == summary_lines(out)[2:]                  # the same numbers (seeded probe)
    assert again.to_dict()["endpoints"] == results.to_dict()["endpoints"]


def summary_lines(out: str) -> list[str]:
    """The demo's closing summary, without the timing line."""
    return out[out.index("demo finished"):].splitlines()[1:]


def check_numbers(demo, results, out):
    """The numbers the demo reports: finite, in range, and on the console as in the files."""
    records = read_metrics(demo / "run")
    losses = [r["loss/total"] for r in records if "loss/total" in r]
    assert len(losses) >= 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert f"loss (total): {losses[0]:.4f} at the first log -> {losses[-1]:.4f} at the last" in out
    last = [r for r in records if "monitor/effective_rank" in r][-1]
    assert 1.0 < last["monitor/effective_rank"] <= 192 and last["monitor/feature_std"] > 0   # ViT-Ti: 192 dims
    assert f"effective_rank: {last['monitor/effective_rank']:.4f}" in out
    knn = [r["monitor/knn_accuracy"] for r in records if "monitor/knn_accuracy" in r]
    initial = [r["monitor/knn_accuracy_init"] for r in records if "monitor/knn_accuracy_init" in r]
    assert len(knn) >= 1 and len(initial) == 1 and all(0.0 <= v <= 1.0 for v in knn + initial)
    assert f"{initial[0]:.3f} with random weights -> {knn[-1]:.3f} after pretraining" in out
    summary = json.loads((demo / "run" / "summary.json").read_text(encoding="utf-8"))
    assert summary["last_losses"]["total"] == losses[-1]
    for endpoint in results.endpoints:
        fractions = [s for s in endpoint.scores if s.kind == "fraction"]
        setting = max(fractions, key=lambda s: s.amount).setting
        means = {}
        for encoder in results.encoders:
            value = endpoint.aggregate(encoder.name, setting, endpoint.headline).mean
            assert math.isfinite(value), (endpoint.name, encoder.name)
            if endpoint.name == "sequence":
                assert 0.0 <= value <= 1.0                     # balanced accuracy
            else:
                assert value > 0                               # age MAE in years
            means["pretrained" if encoder.role == "model" else encoder.name] = value
        line = f"    {endpoint.name} ({endpoint.headline}, {setting}): " + "; ".join(
            f"{name} {value:.3f}" for name, value in means.items())
        printed = [row for row in out.splitlines() if row.startswith(f"    {endpoint.name} (")]
        assert len(printed) == 1
        assert [part.split(" [")[0] for part in printed[0].split(" — ")[0].split("; ")] == line.split("; ")


def test_demo_refuses_an_unknown_config_with_one_line(tmp_path, capsys):
    """Without --iters the demo reads the step count from its config, so a bad config stops it before any stage."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--config", "no_such_config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no_such_config" in err[0]
    assert not (tmp_path / "demo").exists()
