"""Export (checkpoint → timm local-dir folder), load_encoder and its baselines, provenance, checkpoint refusal."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_RECIPE, write_tiny_model
from safetensors.torch import load_file, save_file

import braindino
from braindino.errors import InputError
from braindino.store import SliceStore
from braindino.train import checkpoint as ckpt
from braindino.train.config import load_config
from braindino.train.step import build_networks
from braindino.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "dino_vit_tiny_cpu.yaml"
TINY = TINY_RECIPE + ["crops.n_local=2", "optim.iters=3", "optim.warmup_iters=1",
                      "model.layerscale_init=1.0",   # LayerScale 1: tokens depend on the input
                      "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def trained_run(tiny_store, tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("enc") / "run"
    config = load_config(CONFIG, TINY)
    train(config, tiny_store, run)
    return run, config


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    from braindino.cli import main

    model_dir = tmp_path_factory.mktemp("enc_model") / "model"
    assert main(["export", "--checkpoint", str(trained_run[0]), "--out", str(model_dir), "--with-heads"]) == 0
    return model_dir


def test_checkpoint_records_provenance(trained_run, tiny_store):
    run, config = trained_run
    state = torch.load(ckpt.latest_checkpoint(run), map_location="cpu", weights_only=True)
    provenance = state["provenance"]
    store_json = json.loads((tiny_store / "store.json").read_text())
    assert provenance["preprocessing"] == store_json["preprocessing"]
    assert provenance["store_fingerprint"] == ckpt.store_fingerprint(SliceStore(tiny_store))
    assert len(provenance["store_fingerprint"]) == 16
    assert provenance["input_size"] == 32 and provenance["patch_size"] == 8 and provenance["depth"] == 2
    assert provenance["steps"] == 3 and provenance["objective"] == "dino"
    assert provenance["braindino_version"] == braindino.__version__
    assert provenance["init_from_normalisation_folded"] is False
    assert "global_size: 32" in provenance["config_yaml"]
    assert json.loads((run / "provenance.json").read_text()) == provenance


def test_store_fingerprint_changes_with_content(tiny_store):
    store = SliceStore(tiny_store)
    before = ckpt.store_fingerprint(store)
    store.volumes.loc[0, "content_hash"] = "0" * 64
    assert ckpt.store_fingerprint(store) != before


def test_export_folder_is_timm_hub_format_without_pickles(exported, trained_run):
    files = sorted(p.name for p in exported.iterdir())
    assert files == ["config.json", "heads.safetensors", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    args = config["model_args"]
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_features"] == 192
    assert args["in_chans"] == 1 and args["reg_tokens"] == 4 and args["patch_size"] == 8 and args["depth"] == 2
    assert args["no_embed_class"] and args["dynamic_img_size"] and args["img_size"] == 32
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32] and config["pretrained_cfg"]["mean"] == [0.0]
    assert config["braindino"]["provenance"]["steps"] == 3
    weights = load_file(exported / "model.safetensors")
    assert "mask_token" not in weights and "cls_token" in weights and "reg_token" in weights
    heads = load_file(exported / "heads.safetensors")
    assert heads and all(name.startswith(("dino_head.", "ibot_head.")) for name in heads)


def test_timm_encoder_and_teacher_agree_at_another_size(exported, trained_run):
    """timm local-dir model, load_encoder and the checkpoint's MaskableViT teacher: same CLS and patch tokens."""
    run, config = trained_run
    _student, teacher, _objective, _attn = build_networks(config, torch.device("cpu"))
    teacher.load_state_dict(ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["teacher"])
    x = torch.rand(3, 1, 48, 48, generator=torch.Generator().manual_seed(0))       # trained at 32 px
    with torch.no_grad():
        reference = teacher.backbone.forward_features(x)
        timm_model = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
        tokens = timm_model.forward_features(x)
        encoder = braindino.load_encoder(exported, device="cpu")
        ours = encoder.backbone(x)
    first_patch = 1 + timm_model.num_reg_tokens
    for cls, patch in ((tokens[:, 0], tokens[:, first_patch:]), (ours["cls"], ours["patch"])):
        assert (cls - reference["cls"]).abs().max() <= 1e-5
        assert patch.shape == reference["patch"].shape == (3, 36, 192)
        assert (patch - reference["patch"]).abs().max() <= 1e-5
    assert (reference["cls"] - teacher.backbone.forward_features(torch.rand(3, 1, 48, 48))["cls"]).abs().max() > 0.1


def test_encoder_attributes_from_model_folder(exported, tiny_store):
    encoder = braindino.load_encoder(str(exported), device="cpu")
    assert encoder.input_size == 32 and encoder.patch_size == 8 and encoder.grid == (4, 4)
    assert encoder.embed_dim == 192 and len(encoder.fingerprint) == 16
    assert encoder.preprocessing.size == 32
    assert encoder.trainable_parameters() == sum(t.numel() for t in load_file(exported / "model.safetensors").values())
    out = encoder.embed_slices(torch.rand(2, 1, 32, 32), patch_tokens=True)
    assert out["cls"].shape == (2, 192) and out["patch"].shape == (2, 16, 192) and out["cls"].dtype == torch.float32
    torch.testing.assert_close(out["mean_patch"], out["patch"].mean(1))
    rows = out["patch"].reshape(2, 4, 4, 192).mean(2)                   # grid rows: patient Left (0, 1), Right (2, 3)
    torch.testing.assert_close(out["hemispheres"], torch.stack([rows[:, :2].mean(1), rows[:, 2:].mean(1)], 1))
    with pytest.raises(ValueError, match="preprocessing.size"):
        encoder.embed_slices(torch.rand(2, 1, 48, 48))
    other = encoder.random_like(seed=1)
    assert other.fingerprint not in (encoder.fingerprint, encoder.random_like(seed=2).fingerprint)
    assert other.random_like(seed=1).fingerprint == other.fingerprint and other.grid == encoder.grid


def test_random_and_pixels_copy_their_like(exported):
    model = braindino.load_encoder(exported, device="cpu")
    random = braindino.load_encoder("random:vit_small:3", device="cpu", like=model)
    assert (random.patch_size, random.input_size, random.embed_dim) == (8, 32, 384)
    assert len(random.backbone.vit.blocks) == 2 and random.backbone.vit.num_reg_tokens == 4
    assert random.preprocessing == model.preprocessing
    assert braindino.load_encoder("random:vit_small:3", like=model).fingerprint == random.fingerprint
    default = braindino.load_encoder("random:vit_tiny", device="cpu")
    assert default.input_size == 224 and default.patch_size == 16 and len(default.backbone.vit.blocks) == 12
    pixels = braindino.load_encoder("pixels:4", device="cpu", like=model)
    assert (pixels.input_size, pixels.patch_size, pixels.embed_dim, pixels.grid) == (32, 8, 16, (4, 4))


def test_pixel_baseline_values():
    encoder = braindino.load_encoder("pixels:2", device="cpu")
    size = encoder.preprocessing.size
    x = torch.zeros(1, 1, size, size)
    x[0, 0, :, : size // 2] = 0.3          # left half 0.3 -> histogram bin 1 of 4 ((0.25, 0.5])
    x[0, 0, : size // 2, size // 2:] = 1.0  # top right quarter 1.0 -> bin 3
    out = encoder.embed_slices(x, patch_tokens=True)
    torch.testing.assert_close(out["cls"], torch.tensor([[0.3, 1.0, 0.3, 0.0]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out["mean_patch"], torch.tensor([[0.0, 2 / 3, 0.0, 1 / 3]]))
    half = size // 2
    assert out["patch"].shape == (1, 4, half * half)
    torch.testing.assert_close(out["patch"][0, 1], x[0, 0, :half, half:].reshape(-1))
    expected = torch.tensor([(0.3 + 1.0) / 2, (0.3 + 0.0) / 2])[None, :, None].expand(1, 2, half * half)
    torch.testing.assert_close(out["hemispheres"], expected)          # rows < size/2 (Left), then the rest


def test_natural_image_folder_replicates_and_normalises(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8,
                            num_classes=5).eval()
    save_file(vit.state_dict(), tmp_path / "model.safetensors")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 5,
              "model_args": {"depth": 1, "img_size": 32, "patch_size": 8},
              "pretrained_cfg": {"input_size": [3, 32, 32], "mean": mean, "std": std, "num_classes": 5}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    encoder = braindino.load_encoder(tmp_path, device="cpu", like=braindino.load_encoder("pixels:4"))
    assert encoder.input_size == 32 and encoder.preprocessing.size == 224
    x = torch.rand(2, 1, 224, 224)
    small = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
    rgb = (small.expand(-1, 3, -1, -1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = vit.forward_features(rgb)[:, 0]
    torch.testing.assert_close(encoder.embed_slices(x)["cls"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case,message", [
    ("missing", "model folder not found"),
    ("pickle_only", "only pickled weights"),
    ("mismatch", "weights do not match config.json"),
    ("unknown_random", "unknown random encoder"),
])
def test_bad_model_specs_are_one_line_input_errors(tmp_path, case, message):
    folder = tmp_path / "model"
    spec = str(folder)
    if case == "pickle_only":
        folder.mkdir()
        torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
        (folder / "config.json").write_text("{}")
    elif case == "mismatch":
        write_tiny_model(folder)
        config = json.loads((folder / "config.json").read_text())
        config["model_args"]["depth"] = 2
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "unknown_random":
        spec = "random:vit_gigantic"
    with pytest.raises(InputError, match=message) as raised:
        braindino.load_encoder(spec, device="cpu")
    assert "\n" not in str(raised.value)


def test_export_refuses_a_checkpoint_without_provenance(trained_run, tmp_path, capsys):
    from braindino.cli import main

    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(trained_run[0]))
    del state["provenance"]
    old = tmp_path / "step-00000003.pt"
    torch.save(state, old)
    assert main(["export", "--checkpoint", str(old), "--out", str(tmp_path / "m")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "no provenance" in error and "\n" not in error
    assert not (tmp_path / "m").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/braindino_pwned",))


@pytest.mark.parametrize("content", ["garbage", "pickle", "plain_dict"])
def test_resume_from_a_non_checkpoint_is_one_error_line(tiny_store, tmp_path, content):
    bad = tmp_path / "step-00000001.pt"
    if content == "garbage":
        bad.write_bytes(b"\x00not a checkpoint at all" * 10)
    elif content == "pickle":
        bad.write_bytes(pickle.dumps(_Exploit()))
    else:
        torch.save({"weights": torch.zeros(2)}, bad)
    result = subprocess.run([sys.executable, str(ROOT / "train_dino.py"), "--config", str(CONFIG), "--data",
                             str(tiny_store), "--out", str(tmp_path / "run"), "--resume-from", str(bad), *TINY],
                            capture_output=True, text=True, encoding="utf-8", timeout=300)
    error = result.stderr.strip()
    assert result.returncode == 1 and error.startswith("error:") and "\n" not in error, error
    assert "not a braindino checkpoint" in error and "Traceback" not in error
    assert not Path("/tmp/braindino_pwned").exists()


def test_import_braindino_is_light():
    code = "import sys, braindino; assert 'torch' not in sys.modules; assert callable(braindino.load_encoder)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encoder_runs_bf16_and_matches_fp32(exported):
    gpu = braindino.load_encoder(exported)
    cpu = braindino.load_encoder(exported, device="cpu")
    assert gpu.device.type == "cuda"
    x = torch.rand(4, 1, 32, 32)
    a, b = gpu.embed_slices(x)["cls"], cpu.embed_slices(x)["cls"]
    assert a.dtype == torch.float32 and (a - b).abs().max() < 0.05 * b.abs().max()
    assert not torch.equal(a, b)    # bf16 autocast really ran
    np.testing.assert_array_equal(gpu.to("cpu").embed_slices(x)["cls"].numpy(), b.numpy())


def test_simclr_run_exports_its_student(tiny_store, tmp_path, capsys):
    from braindino.cli import main

    config = load_config(ROOT / "configs" / "simclr_vit_tiny_cpu.yaml",
                         [t for t in TINY if not t.startswith(("dino.", "ibot."))] +
                         ["simclr.hidden_dim=32", "simclr.projection_dim=16"])
    train(config, tiny_store, tmp_path / "run")
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "m"),
                 "--network", "teacher"]) == 2
    assert "has no teacher" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 0
    config_json = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config_json["braindino"]["provenance"]["network"] == "student"
    assert config_json["braindino"]["provenance"]["objective"] == "simclr"
    assert braindino.load_encoder(tmp_path / "m", device="cpu").embed_dim == 192
