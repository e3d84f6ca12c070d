"""The probe report: report.md tables hold the results' exact numbers, the plain-words verdicts follow the paired
test, every figure is a real PNG and report.html is self-contained.

One hand-built run (classification, regression, survival, segmentation endpoints; a model and two baselines;
two seeds) goes through metrics.json-style JSON and ``ProbeResults.from_dict``, as PROBE's output would.
"""

import base64
import dataclasses
import json
import re
import shutil

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from braindino.errors import InputError  # noqa: E402
from braindino.probe import report  # noqa: E402
from braindino.probe.report import write_html, write_report  # noqa: E402
from braindino.probe.results import ProbeResults  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENCODERS = ["braindino:run1", "random_like", "pixels"]
PARAMETERS = {"braindino:run1": 5_000_000, "random_like": 5_000_000, "pixels": 0}
SEEDS = [0, 1]
SUBJECTS = [f"sub-{i:02d}" for i in range(12)]
CLASSES = ["healthy", "lesion", "tumour"]
ENDPOINTS = {   # name: (task, metrics, settings, {(setting, baseline): (difference, p)})
    "diagnosis": ("classification", ["balanced_accuracy", "auc", "f1_macro"], ["10%", "100%", "1-shot", "5-shot"],
                  {("10%", "random_like"): (0.12, 0.004), ("100%", "random_like"): (0.03, 0.31),
                   ("10%", "pixels"): (-0.2, 0.0002), ("100%", "pixels"): (0.01, 0.5)}),
    "age": ("regression", ["mae", "pearson_r"], ["25%", "100%"],
            {("25%", "random_like"): (-2.5, 0.02), ("100%", "random_like"): (0.4, 0.6),
             ("25%", "pixels"): (-1.0, 0.2), ("100%", "pixels"): (-0.1, 0.9)}),
    "os": ("survival", ["c_index", "logrank_p"], ["50%", "100%"],
           {("50%", "random_like"): (0.05, 0.08), ("100%", "random_like"): (0.02, 0.4),
            ("50%", "pixels"): (-0.01, 0.7), ("100%", "pixels"): (0.04, 0.051)}),
    "lesion": ("segmentation", ["dice_mean", "dice_1"], ["100%"],
               {("100%", "random_like"): (0.1, 0.03), ("100%", "pixels"): (0.2, 0.001)}),
}
EXACT = dict(value=0.81234, low=0.74456, high=0.87999)   # model, diagnosis, 100 %, seed 0, balanced_accuracy


def _scores(name, metrics, settings):
    """Deterministic per-seed scores; one exact value (EXACT) and one undefined log-rank p (None, as in JSON)."""
    scores = []
    for e, encoder in enumerate(ENCODERS):
        for s, setting in enumerate(settings):
            kind = "shot" if setting.endswith("shot") else "fraction"
            amount = float(setting.split("-")[0]) if kind == "shot" else float(setting[:-1])
            for seed in SEEDS:
                values = {m: 0.5 + 0.1 * s - 0.05 * e + 0.00731 * seed + 0.01 * k for k, m in enumerate(metrics)}
                metrics_json = {m: dict(value=v, low=v - 0.05, high=v + 0.05) for m, v in values.items()}
                if "logrank_p" in metrics_json:
                    metrics_json["logrank_p"] = dict(value=None if seed == 1 else 0.0123, low=None, high=None)
                if (name, encoder, setting, seed) == ("diagnosis", ENCODERS[0], "100%", 0):
                    metrics_json["balanced_accuracy"] = dict(EXACT)
                n_train = amount * 3 if kind == "shot" else amount / 100 * 40
                scores.append(dict(encoder=encoder, setting=setting, kind=kind, amount=amount, seed=seed,
                                   n_train=n_train, n_test=len(SUBJECTS), metrics=metrics_json,
                                   head_parameters=1000, fraction_trained=1000 / (1000 + PARAMETERS[encoder])))
    return scores


def _aggregates(scores, metrics, settings):
    items = []
    for encoder in ENCODERS:
        for setting in settings:
            for metric in metrics:
                values = [s["metrics"][metric]["value"] for s in scores
                          if (s["encoder"], s["setting"]) == (encoder, setting)]
                values = np.array([v for v in values if v is not None])
                items.append(dict(encoder=encoder, setting=setting, metric=metric, mean=float(values.mean()),
                                  std=float(values.std()) if len(values) > 1 else None, n_seeds=len(values)))
    return items


def _endpoint(name):
    task, metrics, settings, tests = ENDPOINTS[name]
    scores = _scores(name, metrics, settings)
    return dict(
        name=name, task=task, target=None if task in ("survival", "segmentation") else name,
        time="time" if task == "survival" else None, event="event" if task == "survival" else None,
        mask="mask" if task == "segmentation" else None, sequences=["t1"], fusion="concat", pooling="mean",
        head="linear", protocol="split", folds=None, n_subjects=len(SUBJECTS), dropped={"empty label": 3},
        classes=CLASSES if task == "classification" else None, metrics=metrics, headline=metrics[0],
        higher_is_better={m: m not in ("mae", "logrank_p") for m in metrics}, settings=settings, scores=scores,
        aggregates=_aggregates(scores, metrics, settings),
        comparisons=[dict(metric=metrics[0], setting=setting, model=ENCODERS[0], baseline=baseline,
                          difference=diff, low=diff - 0.05, high=diff + 0.05, p_value=p, n_subjects=len(SUBJECTS),
                          n_resamples=200) for (setting, baseline), (diff, p) in tests.items()],
        notes=["5-shot: skipped for pixels"] if task == "classification" else [],
        mask_dir="masks/lesion" if task == "segmentation" else None)


def _predictions(run_dir, image_dir):
    """predictions.csv rows for every endpoint × encoder × setting × seed × subject, plus the tiny NIfTI files."""
    rng = np.random.default_rng(0)
    rows = []
    for name, (task, _, settings, _) in ENDPOINTS.items():
        for encoder in ENCODERS:
            for setting in settings:
                for seed in SEEDS:
                    for i, subject in enumerate(SUBJECTS):
                        row = dict(endpoint=name, encoder=encoder, setting=setting, kind="fraction", amount=100,
                                   seed=seed, subject=subject, split="test")
                        if task == "classification":
                            prob = rng.dirichlet(np.ones(3))
                            row.update(y_true=CLASSES[i % 3], y_pred=CLASSES[int(np.argmax(prob))],
                                       **{f"prob_{c}": p for c, p in zip(CLASSES, prob)})
                        elif task == "regression":
                            row.update(y_true=40.0 + i, y_pred=40.0 + i + rng.normal(0, 3))
                        elif task == "survival":
                            time = float(rng.uniform(1, 60))
                            row.update(y_true=time, time=time, event=int(i % 3 != 0), risk=float(rng.normal()),
                                       risk_group="high" if i % 2 else "low")
                        else:
                            mask = f"masks/lesion/{subject}.nii.gz" if (encoder, seed, i) == (ENCODERS[0], 0, 0) else ""
                            row.update(y_true=str(image_dir / f"{subject}_mask.nii.gz"), mask=mask, dice_1=0.7)
                        rows.append(row)
    pd.DataFrame(rows).to_csv(run_dir / "predictions.csv", index=False)
    image = rng.random((16, 16, 10)).astype(np.float32)
    labels = np.zeros((16, 16, 10), np.int16)
    labels[4:9, 5:11, 3:7] = 1
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 3.0, 1.0])), image_dir / "sub-00_t1.nii.gz")
    (run_dir / "masks" / "lesion").mkdir(parents=True)
    nib.save(nib.Nifti1Image(labels, np.diag([2.0, 2.0, 3.0, 1.0])), run_dir / "masks/lesion/sub-00.nii.gz")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run_dir, results, report.md text) of the hand-built run."""
    root = tmp_path_factory.mktemp("probe_report")
    run_dir, image_dir, features = root / "run", root / "images", root / "features"
    for folder in (run_dir, image_dir, features):
        folder.mkdir()
    _predictions(run_dir, image_dir)
    pd.DataFrame([dict(path=str(image_dir / f"{s}_t1.nii.gz"), subject=s, sequence="t1") for s in SUBJECTS]
                 ).to_csv(features / "index.csv", index=False)
    data = dict(run_dir=str(run_dir), command="probe.py --model m --manifest x.csv", model=ENCODERS[0], seeds=SEEDS,
                n_bootstrap=200, confidence=0.95, predictions="predictions.csv", elapsed_s=12.5,
                encoders=[dict(name=n, role="model" if i == 0 else "baseline", spec=n, fingerprint=f"{i:016x}",
                               parameters=PARAMETERS[n], features=str(features))
                          for i, n in enumerate(ENCODERS)],
                endpoints=[_endpoint(name) for name in ENDPOINTS])
    results = ProbeResults.from_dict(json.loads(json.dumps(data)))
    path = write_report(run_dir, results)
    assert path == run_dir / "report.md"
    return run_dir, results, path.read_text(encoding="utf-8")


def _row(text, endpoint, encoder, setting):
    """Cells of the scores-table row of (encoder, setting) in the endpoint's section."""
    section = text.split(f"## {endpoint}\n")[1].split("### Comparisons")[0]
    lines = [line for line in section.splitlines() if line.startswith(f"| {encoder} | {setting} |")]
    assert len(lines) == 1, lines
    return [cell.strip() for cell in lines[0].strip("|").split("|")]


def _summary(text, endpoint):
    return next(line for line in text.splitlines() if line.startswith(f"**{endpoint}**"))


def test_scores_table_holds_the_exact_numbers(run):
    run_dir, results, text = run
    cells = _row(text, "diagnosis", ENCODERS[0], "100%")
    assert cells[:5] == ["braindino:run1", "100%", "40", "12", "0.02%"]
    assert cells[5] == "0.812 [0.745, 0.880]"
    assert cells[6] == f"{np.mean([0.81234, 0.6 + 0.00731]):.3f} ± {np.std([0.81234, 0.6 + 0.00731]):.3f}"
    for endpoint in results.endpoints:
        for score in [s for s in endpoint.scores if s.seed == SEEDS[0]]:
            cells = _row(text, endpoint.name, score.encoder, score.setting)
            for k, metric in enumerate(endpoint.metrics):
                value, aggregate = score.metrics[metric], endpoint.aggregate(score.encoder, score.setting, metric)
                if metric == "logrank_p":
                    assert cells[5 + 2 * k] == "0.012"
                else:
                    assert cells[5 + 2 * k] == f"{value.value:.3f} [{value.low:.3f}, {value.high:.3f}]"
                std = "n/a" if aggregate.std is None else f"{aggregate.std:.3f}"
                assert cells[6 + 2 * k].startswith(f"{aggregate.mean:.3f} ± {std}")
    assert "| 0.012 ± n/a (n=1) |" in text        # log-rank p undefined for seed 1: one seed left, no std


def test_comparisons_dropped_and_notes(run):
    _, results, text = run
    for endpoint in results.endpoints:
        for c in endpoint.comparisons:
            assert (f"| {c.setting} | {c.model} | {c.baseline} | {c.metric} | {c.difference:+.3f} "
                    f"[{c.low:+.3f}, {c.high:+.3f}] |") in text
    assert "| 10% | braindino:run1 | random_like | balanced_accuracy | +0.120 [+0.070, +0.170] | 0.004 | n/a | 12 | " \
           "200 | better |" in text
    assert "| 10% | braindino:run1 | pixels | balanced_accuracy | -0.200 [-0.250, -0.150] | <0.001 | n/a | 12 | " \
           "200 | worse |" in text
    assert text.count("- empty label: 3") == 4
    assert "- 5-shot: skipped for pixels" in text


def test_summary_follows_the_paired_test(run):
    _, _, text = run
    diagnosis = _summary(text, "diagnosis")   # smallest fraction 10 %, largest 100 %
    assert "Against random_like: at 10% better (p=0.004), difference +0.120; " \
           "at 100% no significant difference (p=0.310), difference +0.030." in diagnosis
    assert "Against pixels: at 10% worse (p<0.001), difference -0.200;" in diagnosis
    assert "At least one baseline was significantly better than the model." in diagnosis
    assert "did not help" not in diagnosis
    age = _summary(text, "age")               # MAE: lower is better, so a negative difference is an improvement
    assert "at 25% better (p=0.020), difference -2.500;" in age
    assert "at 100% no significant difference (p=0.600), difference +0.400." in age
    survival = _summary(text, "os")           # nothing significant at α = 0.05 (0.051 is not)
    assert "better (" not in survival and "worse (" not in survival
    assert "no significant difference (p=0.051)" in survival
    assert "No significant evidence that pretraining helped on this endpoint" in survival
    assert "The model beat every baseline" in _summary(text, "lesion")


def test_every_figure_is_a_png(run):
    run_dir, _, text = run
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    expected = {"diagnosis-learning-curve", "diagnosis-few-shot", "diagnosis-roc", "diagnosis-confusion",
                "age-learning-curve", "age-predicted-vs-true", "os-learning-curve", "os-kaplan-meier",
                "lesion-learning-curve", "lesion-mask-overlay"}
    assert {re.fullmatch(r"figures/(.+)\.png", link).group(1) for link in links} == expected
    for link in links:
        path = run_dir / link
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels[..., :3].std() > 0.01   # something was drawn
    assert not list((run_dir / "figures").glob(".*.tmp"))


def test_html_is_self_contained(run):
    run_dir, results, text = run
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)
    assert len(sources) == len(re.findall(r"!\[", text)) == 10
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == PNG_SIGNATURE
    assert 'src="figures/' not in page and "http" not in page
    assert "<td>0.812 [0.745, 0.880]</td>" in page
    assert "<th>balanced_accuracy mean ± std</th>" in page
    assert "<strong>diagnosis</strong>" in page and "<code>probe.py --model m --manifest x.csv</code>" in page
    assert write_html(run_dir) == run_dir / "report.html"


def test_missing_inputs_raise_input_error(run, tmp_path):
    _, results, _ = run
    with pytest.raises(InputError, match="predictions file not found"):
        write_report(tmp_path, results)
    with pytest.raises(InputError, match="report.md not found"):
        write_html(tmp_path)


def test_summary_flags_a_baseline_identical_to_the_model(run):
    _, results, _ = run
    twin = dataclasses.replace(results, encoders=[dataclasses.replace(e, fingerprint="f" * 16)
                                                  if e.name in (ENCODERS[0], "random_like") else e
                                                  for e in results.encoders])
    text = report._summary(twin.endpoints[0], twin)
    assert "Note: random_like has the same fingerprint as braindino:run1" in text
    assert "Note:" not in report._summary(results.endpoints[0], results)


def test_empty_predicted_masks_give_a_reason_not_a_figure(run, tmp_path):
    run_dir, results, _ = run
    (tmp_path / "masks").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "masks/sub-00.nii.gz")
    rows = pd.DataFrame(dict(subject=["sub-00", "sub-01"], mask=["masks/sub-00.nii.gz", ""]))
    reason = report._overlay(tmp_path, results.endpoints[3], results, rows, tmp_path / "overlay.png", "here")
    assert reason == "No mask overlay: every predicted mask of here is empty (no foreground voxel)."
    assert not (tmp_path / "overlay.png").exists()


@pytest.fixture(scope="module")
def demo_report(run, tmp_path_factory):
    """(demo folder, report.md text) of the demo report over the hand-built run, with one win at p < 0.001 (diagnosis,
    100 %, vs pixels) that survives every adjustment."""
    import shutil

    from braindino.demo_report import write_demo_report

    run_dir, results, _ = run
    demo = tmp_path_factory.mktemp("demo")
    shutil.copytree(run_dir, demo / "probe")
    data = results.to_dict()
    for endpoint in data["endpoints"]:
        for c in endpoint["comparisons"]:
            if (endpoint["name"], c["setting"], c["baseline"]) == ("diagnosis", "100%", "pixels"):
                c.update(difference=0.05, low=0.02, high=0.08, p_value=0.0004, p_holm=0.0008, p_holm_run=0.0009)
    (demo / "probe" / "metrics.json").write_text(json.dumps(data), encoding="utf-8")
    path = write_demo_report(demo, "demo finished in 1s")
    return demo, path.read_text(encoding="utf-8")


def _glance_row(text, endpoint):
    section = text.split("## Results at a glance")[1].split("\n## ")[0]
    line = next(line for line in section.splitlines() if line.startswith(f"| {endpoint} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_demo_report_opens_with_one_table_then_the_forest_plot_the_curves_and_one_short_verdict(demo_report):
    demo, text = demo_report
    order = [text.index(h) for h in ("## Results at a glance", "![forest plot", "![learning curves",
                                     "## Where pretraining helped, and where it did not",
                                     "## Probing the held-out cohort")]
    assert order == sorted(order)
    assert _glance_row(text, "endpoint") == ["endpoint", "metric (setting)", "pretrained", "random_like", "pixels"]
    diagnosis = _glance_row(text, "diagnosis")
    assert diagnosis[1] == "balanced_accuracy (higher is better; 100%)"
    assert diagnosis[2].startswith("**") and not diagnosis[3].startswith("**")      # the model is best there
    assert diagnosis[4].endswith("▲") and "▲" not in diagnosis[3]                  # p<0.001 marked; p=0.31 not
    age = _glance_row(text, "age")                                                   # mae: the lowest is best
    assert age[4].startswith("**") and not age[2].startswith("**") and "▲" not in "".join(age)
    verdict = text.split("## Where pretraining helped, and where it did not\n\n")[1].split("\n## ")[0].strip()
    assert verdict.count("\n") == 0                                                  # one paragraph
    # unadjusted p (the hand-built run has no Holm values): random_like lost at diagnosis 10 % (p 0.004), age 25 %
    # (0.02), lesion (0.03), not os (0.08); pixels at diagnosis 100 % (the planted p < 0.001) and lesion (0.001)
    assert verdict.startswith("In plain words: the pretrained encoder beat random init on 3 of 4 endpoints and the "
                              "pixel baseline on 2 of 4 endpoints")
    assert verdict.endswith("Wins: diagnosis (over random_like, pixels); age (over random_like); lesion (over "
                            "random_like, pixels).")
    assert text.count("**diagnosis** (classification") == 1                          # the per-endpoint paragraph once
    for name in ("forest", "learning-curves"):
        assert (demo / "figures" / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE
    page = (demo / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == text.count("![")


def test_forest_plot_rows_are_the_models_differences_at_fraction_settings(demo_report):
    from braindino.demo_report import forest_rows

    demo, _ = demo_report
    results = ProbeResults.from_dict(json.loads((demo / "probe" / "metrics.json").read_text(encoding="utf-8")))
    rows = forest_rows(results)
    assert set(rows["label"][rows["endpoint"] == "diagnosis"]) == {"random_like, 10%", "random_like, 100%",
                                                                  "pixels, 10%", "pixels, 100%"}
    win = rows[(rows["endpoint"] == "diagnosis") & (rows["label"] == "pixels, 100%")].iloc[0]
    assert (win["difference"], win["low"], win["high"], win["significant"]) == (0.05, 0.02, 0.08, True)
    assert not rows[(rows["endpoint"] == "age") & (rows["label"] == "random_like, 100%")].iloc[0]["significant"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (Debian package) to render the HTML")
def test_demo_report_renders_in_a_headless_browser(demo_report, tmp_path):
    """report.html as a reader opens it: chromium renders it to a PNG whose top shows the table (dark text on
    white, not a blank or broken page) and whose height takes in every inlined figure."""
    import subprocess

    from matplotlib.image import imread

    demo, text = demo_report
    shot = tmp_path / "page.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1280,1600", (demo / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1280)
    dark = (pixels.mean(axis=-1) < 0.35).mean()
    assert 0.005 < dark < 0.5, dark                       # text and table rules drawn, page not black
