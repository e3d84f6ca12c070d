"""The end-to-end rows of a probe: ``--baseline scratch`` (a small CNN trained from random init on each training set)
and ``--finetune last:K`` / ``lora:R`` (the model's ViT fine-tuned), one trainer (heads.slice_network) for both.

They run through ``probe.py`` on a tiny NIfTI cohort and land in metrics.json (scores, comparisons with Holm), the
report table and the headline; the trainer learns (a planted no-op optimiser step fails the learnability test),
is deterministic by seed, trains exactly the parameters it says, and LoRA leaves the pretrained weights as they were.
"""

import copy
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import lesion_cohort, write_tiny_model

from braindino.probe.results import Comparison, EndpointResult, EncoderInfo, ProbeResults
from heads.finetune import LoRALinear, ViTSliceBackbone
from heads.scratch import ScratchCNN, SliceCNN
from heads.slice_network import SliceBags, SliceNetworkHead
from probe import main

N_SUBJECTS = 12


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("scratch_model") / "model")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 subjects × (T1, FLAIR) volumes [32, 32, 10], half with a bright lesion; labels dx, age, time, event."""
    root = tmp_path_factory.mktemp("scratch_cohort")
    rows = lesion_cohort(root, N_SUBJECTS)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model):
    from braindino import load_encoder
    return load_encoder(str(tiny_model), device="cpu")


TRAINED = ["--baseline", "scratch", "--finetune", "last:1", "--finetune", "lora:2", "--epochs", "3",
           "--max-slices", "3", "--scratch-size", "16"]
COMMON = ["--fractions", "50,100", "--shots", "", "--seeds", "0", "--folds", "3", "--bootstrap", "30",
          "--workers", "1", "--device", "cpu"]


def test_scratch_and_finetune_rows_run_end_to_end(tiny_model, tiny_encoder, cohort, tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["--model", str(tiny_model), "--manifest", str(cohort), "--task", "classification", "--target",
                   "dx", "--out", str(out), *TRAINED, *COMMON])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    results = ProbeResults.from_dict(json.loads((out / "metrics.json").read_text(encoding="utf-8")))
    names = ["model", "random_like", "pixels", "scratch", "model finetune last:1", "model finetune lora:2"]
    assert [e.name for e in results.encoders] == names
    assert [e.role for e in results.encoders][3:] == ["baseline", "finetune", "finetune"]
    scratch = next(e for e in results.encoders if e.name == "scratch")
    assert scratch.parameters == ScratchCNN(size=16).parameters() == 24_504 and scratch.features == ""
    endpoint = results.endpoints[0]
    assert len(endpoint.scores) == len(names) * 2
    for score in endpoint.scores:
        value = score.metrics["balanced_accuracy"].value
        assert np.isfinite(value) and 0 <= value <= 1, (score.encoder, score.setting)
        assert score.n_test == N_SUBJECTS and len(score.fold_metrics["balanced_accuracy"]) == 3
    # every end-to-end row is compared with the model at every setting, Holm-adjusted with the others
    pairs = {(c.setting, c.baseline) for c in endpoint.comparisons}
    assert pairs == {(s, b) for s in ("50%", "100%") for b in names[1:]}
    assert all(c.p_holm is not None and c.p_holm >= c.p_value - 1e-12 for c in endpoint.comparisons)
    assert any(c.p_holm_run is not None for c in endpoint.comparisons if c.baseline == "scratch")
    # parameters trained: all of scratch; last:1 of a depth-1 ViT: its block and norm (+ the output layer)
    vit = tiny_encoder.backbone.vit
    total = sum(p.numel() for p in vit.parameters())
    block = sum(p.numel() for p in [*vit.blocks[-1].parameters(), *vit.norm.parameters()])
    output = 2 * (2 * vit.embed_dim) * 2 + 2                         # Linear(2 sequences × 2D → 2 classes)
    last = endpoint.score("model finetune last:1", "100%", 0)
    assert last.head_parameters == block + output
    assert last.fraction_trained == pytest.approx((block + output) / (total + output))
    assert endpoint.score("scratch", "100%", 0).fraction_trained == 1.0
    lora = endpoint.score("model finetune lora:2", "100%", 0)
    assert lora.head_parameters == 2 * (192 + 576) + 2 * (192 + 192) + output     # rank 2 on qkv and proj, 1 block
    assert 0 < lora.fraction_trained < 0.01
    # the report: a scores row per end-to-end row, the comparisons, the notes, the summary names them
    report = (out / "report.md").read_text(encoding="utf-8")
    for name in names[3:]:
        assert f"| {name} | 100% |" in report and f"| 100% | model | {name} | balanced_accuracy |" in report
    assert "Against scratch:" in report and "Frozen probe against model finetune last:1 (fine-tuned)" in report
    assert "SFCN-like 2D CNN" in report and "p (Holm)" in report
    predictions = pd.read_csv(out / "predictions.csv")
    for (setting, seed), group in predictions.groupby(["setting", "seed"]):        # the same splits for every row
        folds = {enc: dict(zip(g.subject, g.split)) for enc, g in group.groupby("encoder")}
        assert all(f == folds["model"] for f in folds.values()) and set(folds) == set(names)
    assert "dx · model − scratch @ 100%" in captured.out


def test_scratch_regression_and_survival_are_finite(tiny_model, cohort, tmp_path, capsys):
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("- {name: age, task: regression, target: age, pooling: max}\n"
                         "- {name: os, task: survival, time: time, event: event, fusion: mean}\n", encoding="utf-8")
    out = tmp_path / "run"
    status = main(["--model", str(tiny_model), "--manifest", str(cohort), "--endpoints", str(endpoints),
                   "--no-default-baselines", "--baseline", "scratch", "--epochs", "3", "--max-slices", "3",
                   "--scratch-size", "16", "--out", str(out), *COMMON])
    assert status == 0, capsys.readouterr().err
    results = ProbeResults.from_dict(json.loads((out / "metrics.json").read_text(encoding="utf-8")))
    for endpoint in results.endpoints:
        for score in endpoint.scores:
            assert np.isfinite(score.metrics[endpoint.headline].value)
        assert [c.baseline for c in endpoint.comparisons] == ["scratch", "scratch"]


def test_scratch_is_refused_where_only_the_probe_can_train_it(tiny_model):
    from braindino.errors import InputError
    from braindino.probe.encoders import load_encoders

    with pytest.raises(InputError, match="only the probe runs it"):
        load_encoders(str(tiny_model), ["scratch"], device="cpu")


def test_bad_finetune_spec_is_one_error_line(tiny_model, cohort, tmp_path, capsys):
    status = main(["--model", str(tiny_model), "--manifest", str(cohort), "--task", "classification", "--target",
                   "dx", "--finetune", "last:5", "--out", str(tmp_path / "run"), *COMMON])
    err = capsys.readouterr().err
    assert status == 2 and "last:5 asks for more blocks than the model has (1)" in err


# ------------------------------------------------------------------------------------------------- the trainer
def _learnable(n: int, seed: int):
    """``n`` samples of 2 sequences × 4 noisy 32 px slices; class 1 has a faint square (SNR ~1.5 per pixel) at a
    random place in every slice: learnable by a CNN, not by one linear map of the pixels' mean."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    samples = []
    for label in labels:
        sample = []
        for _ in range(2):
            x = rng.uniform(0.2, 0.6, (4, 32, 32)).astype(np.float32)
            if label:
                for s in range(4):
                    r, c = rng.integers(2, 22, size=2)
                    x[s, r:r + 8, c:c + 8] += 0.25
                    x[s] -= 0.25 * 64 / 1024           # the same mean intensity as class 0
            sample.append(x)
        samples.append(sample)
    return samples, labels


def test_scratch_trainer_learns_a_learnable_task():
    train, y_train = _learnable(32, 0)
    test, y_test = _learnable(32, 1)
    head = SliceNetworkHead("classification", ScratchCNN(size=32), epochs=20, random_state=0).fit(train, y_train)
    accuracy = float((head.predict(test) == y_test).mean())
    assert accuracy >= 0.8, accuracy                      # chance: 0.5; with the optimiser's step skipped ~0.5
    assert head.n_validation_ > 0 and 1 <= head.best_epoch_ <= head.epochs_run_ <= 20
    probabilities = head.predict_proba(test)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_trainer_is_deterministic_by_seed_and_leaves_the_global_rng():
    samples, labels = _learnable(12, 2)
    bags = SliceBags(samples)                              # the packed form is read like a list of samples
    assert len(bags) == 12 and np.array_equal(bags[3][1], samples[3][1].astype(np.float16))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    fits = [SliceNetworkHead("classification", ScratchCNN(size=32), epochs=3, random_state=seed).fit(bags, labels)
            for seed in (0, 0, 1)]
    assert torch.rand(1) == before
    first, again, other = (fit.predict_proba(list(bags)) for fit in fits)
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def test_regression_and_survival_targets_train():
    from sksurv.util import Surv

    samples, labels = _learnable(12, 3)
    regression = SliceNetworkHead("regression", ScratchCNN(size=32), epochs=3).fit(samples, 50 + 10 * labels)
    assert np.isfinite(regression.predict(samples)).all()
    survival = SliceNetworkHead("survival", ScratchCNN(size=32), epochs=3).fit(
        samples, Surv.from_arrays(event=labels == 1, time=10.0 + np.arange(12)))
    assert np.isfinite(survival.predict(samples)).all()
    assert SliceCNN()(torch.zeros(2, 1, 16, 16)).shape == (2, 64)


def test_finetune_last_trains_exactly_its_blocks(tiny_encoder):
    backbone = ViTSliceBackbone(copy.deepcopy(tiny_encoder.backbone), "last", 1)
    vit = backbone.backbone.vit
    expected = {f"backbone.vit.{name}" for name, _ in vit.named_parameters()
                if name.startswith("blocks.0.") or name.startswith("norm.")}
    trained = {name for name, p in backbone.named_parameters() if p.requires_grad}
    assert trained == expected
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():                                  # frozen prefix + trained suffix = the encoder's features
        features = backbone(backbone.frozen(x))
    embedded = tiny_encoder.embed_slices(x)
    torch.testing.assert_close(features, torch.cat([embedded["cls"], embedded["mean_patch"]], dim=1))

    class Recipe:                                           # a recipe handing the trainer a fresh copy
        def __call__(self):
            return ViTSliceBackbone(copy.deepcopy(tiny_encoder.backbone), "last", 1)

    samples, labels = _learnable(8, 4)
    head = SliceNetworkHead("classification", Recipe(), epochs=2, backbone_lr=1e-4).fit(samples, labels)
    n_block = sum(p.numel() for p in [*vit.blocks[0].parameters(), *vit.norm.parameters()])
    total = sum(p.numel() for p in vit.parameters())
    assert head.trained_parameters_ == n_block + (2 * 2 * vit.embed_dim * 2 + 2)
    assert head.frozen_parameters_ == total - n_block


def test_lora_leaves_the_pretrained_weights_bit_identical(tiny_encoder):
    original = {k: v.clone() for k, v in tiny_encoder.backbone.vit.state_dict().items()}

    class Recipe:
        def __call__(self):
            return ViTSliceBackbone(copy.deepcopy(tiny_encoder.backbone), "lora", 2)

    samples, labels = _learnable(8, 5)
    torch.manual_seed(0)
    untrained = Recipe()()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():                                  # B = 0: the adapted ViT starts as the pretrained one
        embedded = tiny_encoder.embed_slices(x)
        torch.testing.assert_close(untrained(untrained.frozen(x)),
                                   torch.cat([embedded["cls"], embedded["mean_patch"]], dim=1))
    head = SliceNetworkHead("classification", Recipe(), epochs=3, backbone_lr=1e-2).fit(samples, labels)
    trained_vit = head.network_.backbone.backbone.vit
    adapters = [m for m in trained_vit.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 2 * len(trained_vit.blocks)
    assert any(a.lora_b.abs().max() > 0 for a in adapters)                # the adapters trained
    state = trained_vit.state_dict()
    for key, value in original.items():                                   # every pretrained tensor, bit for bit
        adapted = key.replace(".attn.qkv.", ".attn.qkv.base.").replace(".attn.proj.", ".attn.proj.base.")
        assert torch.equal(state[adapted], value), key
    assert head.trained_parameters_ == sum(a.lora_a.numel() + a.lora_b.numel() for a in adapters) + 2 * 2 * 384 + 2


# ------------------------------------------------------------------------------------------------- verdicts
def _comparison(baseline, setting, difference, p, holm, holm_run=None):
    return Comparison("balanced_accuracy", setting, "model", baseline, difference, difference - 0.1,
                      difference + 0.1, p, 20, 0, "corrected resampled t", 5, holm, holm_run)


def test_verdicts_and_the_demo_headline_count_only_corrected_wins(tmp_path):
    from braindino.demo_report import headline_wins, plain_words, write_demo_report
    from braindino.probe.formatting import verdict_text as _verdict

    assert _verdict(_comparison("scratch", "100%", 0.1, 0.02, 0.08), True, 0.05) == \
        "no significant difference (p=0.020, Holm 0.080)"
    assert _verdict(_comparison("scratch", "100%", 0.1, 0.004, 0.012), True, 0.05) == "better (p=0.004, Holm 0.012)"
    assert _verdict(_comparison("scratch", "100%", 0.1, 0.004, 0.012), True, 0.01) == \
        "no significant difference (p=0.004, Holm 0.012)"                       # alpha is the caller's
    assert _verdict(_comparison("scratch", "100%", -0.1, 0.0001, 0.0003), True, 0.05) == "worse (p<0.001, Holm <0.001)"
    from braindino.demo import _verdict as demo_verdict
    assert demo_verdict(_comparison("pixels", "100%", 0.1, 0.0001, 0.0003), True, 0.05) == \
        "better than pixels (p<0.001, Holm <0.001)"
    assert demo_verdict(_comparison("pixels", "100%", 0.1, 0.03, 0.06), True, 0.05).startswith(
        "no significant difference vs pixels")
    encoders = [EncoderInfo("model", "model", "m", "f0", 10, ""), EncoderInfo("random_like", "baseline", "r", "f1",
                                                                               10, ""),
                EncoderInfo("scratch", "baseline", "scratch", "f2", 5, ""),
                EncoderInfo("model finetune last:1", "finetune", "finetune last:1", "f3", 10, "")]

    def endpoint(name, comparisons):
        return EndpointResult(name, "classification", "y", None, None, None, ["T1"], "concat", "mean", "linear",
                              "cv", 5, 40, {}, ["a", "b"], ["balanced_accuracy"], "balanced_accuracy",
                              {"balanced_accuracy": True}, ["10%", "100%"], comparisons=comparisons)

    results = ProbeResults(str(tmp_path), "probe.py", "model", [0], 100, 0.95, "predictions.csv", 1.0, encoders, [
        endpoint("a", [_comparison("random_like", "100%", 0.1, 0.001, 0.004, 0.01),
                       _comparison("scratch", "100%", 0.1, 0.001, 0.004, 0.2),        # significant before the run's
                       _comparison("model finetune last:1", "100%", 0.2, 0.001, 0.004, 0.001)]),   # Holm only
        endpoint("b", [_comparison("random_like", "10%", -0.1, 0.0001, 0.0004, 0.0008),   # significantly worse
                       _comparison("scratch", "10%", 0.1, 0.0001, 0.0004, 0.0009)])])   # p < 0.001 counts
    assert headline_wins(results) == {"random_like": (1, 2), "scratch": (1, 2)}
    assert headline_wins(results, alpha=0.005) == {"random_like": (0, 2), "scratch": (1, 2)}
    sentence = plain_words(results)
    assert sentence.startswith("In plain words: the pretrained encoder beat random init on 1 of 2 endpoints and "
                               "the CNN trained from scratch on 1 of 2 endpoints")
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "metrics.json").write_text(json.dumps(results.to_dict()), encoding="utf-8")
    (probe / "report.md").write_text("# Probe report: model\n\n## Summary\n\n**a** verdicts.\n\n## a\n",
                                     encoding="utf-8")
    report = write_demo_report(tmp_path, "1 s")
    text = report.read_text(encoding="utf-8")
    assert sentence in text and "(`scratch`" in text and "## Results at a glance" in text
