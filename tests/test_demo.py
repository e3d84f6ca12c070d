"""`braindino demo`, the README's main command, end to end on a small, coarse synthetic cohort."""

import json

from braindino.cli import main


def test_demo_runs_every_stage_and_summarises(tmp_path, capsys):
    status = main(["demo", "--out", str(tmp_path / "demo"), "--subjects", "3", "--iters", "6",
                   "--resolution", "3", "--workers", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert (tmp_path / "demo" / "cohort" / "manifest.csv").exists()
    assert (tmp_path / "demo" / "store" / "store.json").exists()
    summary = json.loads((tmp_path / "demo" / "run" / "summary.json").read_text())
    assert summary["steps_run"] == 6 and summary["objective"] == "dino"
    assert "demo finished" in out and "effective_rank" in out and "kNN accuracy of the MRI sequence" in out
    # running it again resumes every stage instead of redoing or failing
    assert main(["demo", "--out", str(tmp_path / "demo"), "--subjects", "3", "--iters", "6",
                 "--resolution", "3", "--workers", "1"]) == 0
