"""Tests for braindino.models: MaskableViT, DINOHead, parameter_groups, load_pretrained_backbone (tiny CPU models)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from braindino.errors import InputError
from braindino.models import DINOHead, MaskableViT, build_backbone, load_pretrained_backbone, parameter_groups

TINY = dict(depth=2, img_size=32, patch_size=8)


def tiny_vit(seed: int = 0, **overrides) -> MaskableViT:
    torch.manual_seed(seed)
    model = build_backbone("vit_tiny", **{**TINY, **overrides}).eval()
    with torch.no_grad():
        model.mask_token.normal_()  # non-zero, so a wrongly applied mask token would show
    return model


def images(batch: int, height: int, width: int, channels: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------- MaskableViT
@pytest.mark.parametrize("height,width", [(32, 32), (16, 16), (16, 40)])
def test_output_shapes_for_any_size_divisible_by_patch(height, width):
    model = tiny_vit()
    out = model.forward_features(images(2, height, width))
    num_patches = (height // 8) * (width // 8)
    assert out["cls"].shape == (2, 192)
    assert out["registers"].shape == (2, 4, 192)
    assert out["patch"].shape == (2, num_patches, 192)
    assert model(images(2, height, width)).shape == (2, 192)
    assert (model.embed_dim, model.patch_size, model.num_register_tokens, model.depth) == (192, 8, 4, 2)


@pytest.mark.parametrize("size", [32, 16])
def test_unmasked_path_equals_timm_forward_features(size):
    model = tiny_vit()
    x = images(3, size, size)
    with torch.no_grad():
        ours = model.forward_features(x)
        reference = model.vit.forward_features(x)  # [B, 1 + R + N, D]
    torch.testing.assert_close(ours["cls"], reference[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(ours["registers"], reference[:, 1:5], rtol=0, atol=0)
    torch.testing.assert_close(ours["patch"], reference[:, 5:], rtol=0, atol=0)
    torch.testing.assert_close(model(x), reference[:, 0], rtol=0, atol=0)


def test_masked_patches_take_mask_token_before_position_embedding():
    model = tiny_vit()
    vit = model.vit
    x = images(2, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5, 15]] = True
    with torch.no_grad():
        ours = model.forward_features(x, masks)
        # hand-built iBOT reference: swap embeddings, add patch position embeddings, prepend CLS + registers
        tokens = vit.patch_embed(x).flatten(1, 2)  # [B, N, D]
        tokens = torch.where(masks[..., None], model.mask_token, tokens) + vit.pos_embed
        prefix = torch.cat([vit.cls_token, vit.reg_token], dim=1).expand(2, -1, -1)
        reference = vit.norm(vit.blocks(torch.cat([prefix, tokens], dim=1)))
        unmasked = model.forward_features(x)
    torch.testing.assert_close(ours["patch"], reference[:, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["cls"], reference[:, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours["patch"][0], unmasked["patch"][0], atol=1e-3)
    torch.testing.assert_close(ours["patch"][1], unmasked["patch"][1], rtol=1e-5, atol=1e-6)  # unmasked image


def test_mask_token_equal_to_patch_embedding_leaves_output_unchanged():
    model = tiny_vit()
    x = images(1, 32, 32)
    patch = x[:, :, 0:8, 8:16].clone()  # grid position 1
    x[:, :, 16:24, 24:32] = patch       # grid position 11 holds the same pixels
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, [1, 11]] = True
    with torch.no_grad():
        model.mask_token.copy_(model.vit.patch_embed(patch).reshape(1, 1, -1))
        masked = model.forward_features(x, masks)
        unmasked = model.forward_features(x)
    for key in ("cls", "patch", "registers"):
        torch.testing.assert_close(masked[key], unmasked[key], rtol=1e-5, atol=1e-5)


def test_bad_masks_are_rejected():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        model.forward_features(images(2, 32, 32), torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        model.forward_features(images(2, 32, 32), torch.zeros(2, 16))


# ----------------------------------------------------------------------------------------------------- DINOHead
def test_dino_head_unit_rows_fixed_norm_and_reference_output():
    torch.manual_seed(0)
    head = DINOHead(in_dim=24, out_dim=50, hidden_dim=32, bottleneck_dim=16, n_layers=3)
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    assert not g.requires_grad
    assert head.last_layer_parameters() == [v]
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]

    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=10.0)
    x = torch.randn(4, 3, 24)
    head(x).pow(2).sum().backward()
    optimizer.step()
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))
    torch.testing.assert_close(g, torch.ones(50, 1), rtol=0, atol=0)

    with torch.no_grad():
        out = head(x)
        bottleneck = head.mlp(x)
        expected = (bottleneck / bottleneck.norm(dim=-1, keepdim=True)) @ (v / v.norm(dim=1, keepdim=True)).T
    assert out.shape == (4, 3, 50)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_dino_head_single_layer():
    head = DINOHead(in_dim=24, out_dim=10, bottleneck_dim=8, n_layers=1)
    assert [type(m) for m in head.mlp] == [nn.Linear]
    assert head(torch.randn(5, 24)).shape == (5, 10)


def test_dino_head_batchnorm_normalises_over_all_leading_dims_with_batch_statistics():
    torch.manual_seed(0)
    head = DINOHead(in_dim=24, out_dim=10, hidden_dim=32, bottleneck_dim=8, n_layers=3, batchnorm=True)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear, nn.BatchNorm1d, nn.GELU,
                                           nn.Linear]
    x = torch.randn(4, 3, 24) + 5.0                     # a component every token shares
    out, bottleneck = head(x, return_bottleneck=True)
    flat, _ = head(x.flatten(0, 1), return_bottleneck=True)
    torch.testing.assert_close(out, flat.unflatten(0, (4, 3)))   # tokens of all samples form one batch
    hidden = head.mlp[1](head.mlp[0](x.flatten(0, 1)))
    torch.testing.assert_close(hidden.mean(0), torch.zeros(32), atol=1e-5, rtol=0)  # shared part removed
    head.eval()                                         # no running statistics: eval normalises like train
    torch.testing.assert_close(head(x), out)


# ----------------------------------------------------------------------------------------------------- parameter_groups
def _settings_by_name(model, groups):
    by_id = {}
    for group in groups:
        for parameter in group["params"]:
            assert id(parameter) not in by_id, "parameter in two groups"
            by_id[id(parameter)] = (group["lr_multiplier"], group["wd_multiplier"], group["weight_decay"])
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


def test_parameter_groups_layer_decay_and_no_weight_decay():
    backbone = tiny_vit()
    model = nn.ModuleDict({"backbone": backbone, "dino_head": DINOHead(192, 20, 32, 16)})
    groups = parameter_groups(model, weight_decay=0.04, layer_decay=0.5, patch_embed_lr_multiplier=0.1)
    settings = _settings_by_name(model, groups)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(settings) == trainable  # every trainable parameter in exactly one group, frozen g in none
    assert "dino_head.last_layer.parametrizations.weight.original0" not in settings
    assert all(set(group) == {"params", "lr_multiplier", "wd_multiplier", "weight_decay", "name"} for group in groups)

    lr = {name: value[0] for name, value in settings.items()}
    # depth 2: multiplier 0.5 ** (3 - layer_id); embeddings layer 0, block i layer i + 1, final norm / heads layer 3
    assert lr["backbone.vit.cls_token"] == lr["backbone.vit.pos_embed"] == lr["backbone.mask_token"] == 0.125
    assert lr["backbone.vit.reg_token"] == 0.125
    assert lr["backbone.vit.patch_embed.proj.weight"] == pytest.approx(0.0125)
    assert lr["backbone.vit.blocks.0.attn.qkv.weight"] == lr["backbone.vit.blocks.0.norm1.bias"] == 0.25
    assert lr["backbone.vit.blocks.1.mlp.fc2.weight"] == lr["backbone.vit.blocks.1.ls2.gamma"] == 0.5
    assert lr["backbone.vit.norm.weight"] == lr["dino_head.mlp.0.weight"] == 1.0

    tokens = {"backbone.vit.pos_embed", "backbone.vit.cls_token", "backbone.vit.reg_token", "backbone.mask_token"}
    expected_no_wd = {
        name for name in trainable
        if name.endswith(".bias") or ".norm" in name or ".ls1." in name or ".ls2." in name or name in tokens
    }
    no_wd = {name for name, (_, wd_multiplier, _) in settings.items() if wd_multiplier == 0.0}
    assert no_wd == expected_no_wd
    assert {settings[name][2] for name in trainable - no_wd} == {0.04}
    assert {settings[name][2] for name in no_wd} == {0.0}


def test_parameter_groups_on_bare_backbone_without_decay():
    model = tiny_vit()
    groups = parameter_groups(model, weight_decay=0.1)
    assert {group["lr_multiplier"] for group in groups} == {1.0}
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))


# ----------------------------------------------------------------------------------------------------- init_from
def rgb_timm_vit(seed=0, **overrides) -> VisionTransformer:
    """A timm ViT in the layout of public checkpoints: RGB, CLS position embedding, classifier head."""
    torch.manual_seed(seed)
    config = dict(img_size=64, patch_size=16, in_chans=3, embed_dim=192, depth=2, num_heads=3, reg_tokens=4)
    model = VisionTransformer(**{**config, **overrides}).eval()
    with torch.no_grad():
        for token in (model.cls_token, model.reg_token):
            if token is not None:
                token.normal_()
    return model


def save_module_pth(state: dict, path) -> None:
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_load_rgb_patch16_into_grey_patch8(tmp_path, fmt):
    source = rgb_timm_vit()
    state = source.state_dict()
    path = tmp_path / f"weights.{fmt}"
    save_file(state, str(path)) if fmt == "safetensors" else save_module_pth(state, path)
    target = tiny_vit()
    report = load_pretrained_backbone(target, str(path), input_mean=None)

    grey_kernel = state["patch_embed.proj.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(target.vit.patch_embed.proj.weight, resample_patch_embed(grey_kernel, [8, 8]))
    assert target.vit.pos_embed.shape == (1, 16, 192)  # 64/16 and 32/8: same 4x4 grid, prefix entries folded out
    torch.testing.assert_close(target.vit.pos_embed, state["pos_embed"][:, 5:], rtol=0, atol=0)
    torch.testing.assert_close(target.vit.cls_token, state["cls_token"] + state["pos_embed"][:, :1])
    for key, value in state.items():
        if key.startswith("blocks.") and "ls" not in key:
            torch.testing.assert_close(target.vit.state_dict()[key], value, rtol=0, atol=0)
    assert report["missing"] == ["mask_token"]
    assert set(report["unexpected"]) == {"vit.head.weight", "vit.head.bias"}
    assert any("3 -> 1 input channels" in line for line in report["adapted"])
    assert any("resampled" in line for line in report["adapted"])


@pytest.mark.parametrize("normalised", [False, True], ids=["channel-sum", "imagenet-folded"])
def test_same_patch_size_is_exact_and_grey_image_matches_rgb_replica(tmp_path, normalised):
    """The 1-channel model on a grey slice == the RGB model on that slice replicated (and normalised, by default)."""
    from braindino.models.init_from import IMAGENET_MEAN, IMAGENET_STD

    source = rgb_timm_vit()
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    target = tiny_vit(img_size=64, patch_size=16)  # LayerScale 1e-5 in the model, none in the file
    if normalised:
        report = load_pretrained_backbone(target, str(path))
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        assert any("folded in" in line for line in report["adapted"])
    else:
        report = load_pretrained_backbone(target, str(path), input_mean=None)
        mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
        torch.testing.assert_close(target.vit.patch_embed.proj.weight,
                                   source.patch_embed.proj.weight.sum(dim=1, keepdim=True), rtol=0, atol=0)
    assert "blocks.0.ls1.gamma: set to 1 (checkpoint has no LayerScale)" in report["adapted"]
    grey = images(2, 64, 64)
    with torch.no_grad():
        expected = source.forward_features((grey.expand(-1, 3, -1, -1) - mean) / std)
        ours = target.forward_features(grey)
    torch.testing.assert_close(ours["cls"], expected[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours["patch"], expected[:, 5:], rtol=1e-4, atol=1e-4)


def test_position_embedding_grid_is_resampled(tmp_path):
    source = rgb_timm_vit(reg_tokens=0)  # CLS-only prefix, like timm vit_small_patch14_dinov2
    state = source.state_dict()
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    target = tiny_vit(img_size=48, patch_size=16)
    load_pretrained_backbone(target, str(path))
    assert target.vit.pos_embed.shape == (1, 9, 192)
    expected = resample_abs_pos_embed(state["pos_embed"][:, 1:], new_size=[3, 3], old_size=[4, 4], num_prefix_tokens=0)
    torch.testing.assert_close(target.vit.pos_embed, expected, rtol=0, atol=0)


def test_original_dinov2_names_and_layerscale_folding(tmp_path):
    # DINOv2 layout: pos_embed covers CLS + patches, registers separate, LayerScale, a [1, D] mask token
    source = rgb_timm_vit(no_embed_class=True, init_values=0.5)
    with torch.no_grad():
        for block in source.blocks:
            block.ls1.gamma.uniform_(0.5, 1.5)
            block.ls2.gamma.uniform_(0.5, 1.5)
    state = {f"teacher.backbone.{k}": v for k, v in source.state_dict().items()}
    cls_pos = torch.randn(1, 1, 192)
    state["teacher.backbone.cls_token"] = state.pop("teacher.backbone.cls_token") - cls_pos
    state["teacher.backbone.pos_embed"] = torch.cat([cls_pos, state["teacher.backbone.pos_embed"]], dim=1)
    state["teacher.backbone.register_tokens"] = state.pop("teacher.backbone.reg_token")
    state["teacher.backbone.mask_token"] = torch.randn(1, 192)
    state["student.backbone.cls_token"] = torch.zeros(1, 1, 192)
    path = tmp_path / "dinov2.pth"
    torch.save({"model": state}, path)

    target = tiny_vit(img_size=64, patch_size=16, in_chans=3, layerscale_init=None)
    report = load_pretrained_backbone(target, str(path))
    assert "blocks.1.ls2.gamma: folded into mlp.fc2 (model has no LayerScale)" in report["adapted"]
    torch.testing.assert_close(target.mask_token, state["teacher.backbone.mask_token"].view(1, 1, 192))
    x = images(2, 64, 64, channels=3)
    with torch.no_grad():
        expected = source.forward_features(x)
        ours = target.forward_features(x)
    torch.testing.assert_close(ours["cls"], expected[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours["registers"], expected[:, 1:5], rtol=1e-4, atol=1e-5)


def test_bad_weight_files_raise_input_error(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    wrong_suffix = tmp_path / "weights.txt"
    wrong_suffix.write_text("hello")
    not_vit = tmp_path / "not_vit.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(not_vit))
    for path in (garbage, wrong_suffix, not_vit, tmp_path / "missing.safetensors"):
        with pytest.raises(InputError) as error:
            load_pretrained_backbone(tiny_vit(), str(path))
        assert str(path) in str(error.value) and "\n" not in str(error.value)

    tiny_weights = tmp_path / "tiny.safetensors"
    save_file(rgb_timm_vit().state_dict(), str(tiny_weights))
    with pytest.raises(InputError, match="embed_dim 192 != model embed_dim 384"):
        load_pretrained_backbone(build_backbone("vit_small", depth=2, img_size=32, patch_size=8), str(tiny_weights))
    with pytest.raises(InputError, match="depth 2 != model depth 3"):
        load_pretrained_backbone(tiny_vit(depth=3), str(tiny_weights))
    with pytest.raises(InputError, match="reg_token has shape"):
        load_pretrained_backbone(tiny_vit(num_register_tokens=2), str(tiny_weights))


def test_deepcopy_keeps_weight_norm_head_working():
    head = DINOHead(in_dim=8, out_dim=6, hidden_dim=16, bottleneck_dim=4)
    teacher = copy.deepcopy(head)
    x = torch.randn(2, 8)
    torch.testing.assert_close(teacher(x), head(x), rtol=0, atol=0)
    assert F.normalize(teacher.last_layer.weight, dim=1).allclose(teacher.last_layer.weight, atol=1e-6)
