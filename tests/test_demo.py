"""`braindino demo`, the README's main command, end to end on a small, coarse synthetic cohort."""

import json

from braindino.cli import main
from braindino.probe.results import ProbeResults

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
    assert [e.role for e in results.encoders] == ["model", "baseline", "baseline"]
    endpoints = {e.name: e for e in results.endpoints}
    assert {"sequence", "age"} <= set(endpoints)
    assert endpoints["sequence"].unit == "volume" and endpoints["sequence"].protocol == "cv"
    assert endpoints["age"].n_subjects == 8
    html = (demo / "probe" / "report.html").read_text(encoding="utf-8")
    assert "<table" in html and "data:image/png;base64," in html
    assert "demo finished" in out and "effective_rank" in out and "held-out cohort" in out
    assert "sequence (balanced_accuracy, 100%): pretrained" in out
    # running it again resumes every stage instead of redoing or failing
    assert main(["demo", "--out", str(demo), *SHRUNK]) == 0
    assert "manifest.csv exists: kept" in capsys.readouterr().out
