"""Initialise a MaskableViT from timm-format ViT weights downloaded elsewhere (DINOv2, timm ``vit_*`` models).

Accepted files: ``.safetensors``, or ``.pth`` / ``.pt`` / ``.bin`` read with ``torch.load(weights_only=True)`` (nothing
is unpickled beyond tensors and plain containers). The state dict may sit under ``"state_dict"``, ``"model"`` or
``"teacher"`` and carry prefixes such as ``module.``, ``model.``, ``teacher.``, ``backbone.`` (for ``teacher.`` and
``backbone.`` only the keys with that prefix are kept: teacher over student, backbone over heads). Original DINOv2
key names (``register_tokens``, chunked ``blocks.<chunk>.<i>.``, ``mask_token [1, D]``) are renamed to timm's.

Adaptations, each listed in the returned ``"adapted"`` (all exact unless noted):

- Patch embedding ``[D, 3, p, p]`` -> ``[D, 1, p, p]``, folding in the input normalisation the checkpoint was trained
  with (``input_mean``/``input_std``, ImageNet's by default): the RGB model saw ``(x_c - m_c) / s_c``, so for a grey
  slice replicated to RGB ``sum_c W_c (x - m_c) / s_c + b = (sum_c W_c / s_c) x + (b - sum_c (m_c / s_c) sum W_c)``,
  i.e. ``W' = sum_c W_c / s_c`` and ``b' = b - sum_c (m_c / s_c) * W_c.sum((1, 2))``: the 1-channel model on a [0, 1]
  slice responds exactly as the RGB model on that slice replicated and normalised. With ``input_mean=None`` the
  channels are just summed (timm ``adapt_input_conv``).
- Patch size: kernel resampled with timm ``resample_patch_embed`` (FlexiViT pseudo-inverse; approximate).
- Position embeddings: this model embeds patch positions only, so position embeddings the checkpoint kept for its CLS
  (and register) tokens are added into those tokens (each is a constant vector, so the sum is the same input); the
  patch grid (assumed square in the checkpoint) is resampled to the model's grid with timm ``resample_abs_pos_embed``
  (bicubic; approximate).
- LayerScale: a checkpoint without it loads into a model with it by setting its gammas to 1; a checkpoint with it
  loads into a model without it by folding each gamma into the preceding projection (``attn.proj`` / ``mlp.fc2``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv
from torch import Tensor

from braindino.errors import InputError
from braindino.models.vit import MaskableViT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_CONTAINER_KEYS = ("state_dict", "model", "teacher")
_SELECT_PREFIXES = ("teacher.", "backbone.")
_STRIP_PREFIXES = ("module.", "model.", "vit.")
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_LAYERSCALE_TARGETS = {"ls1": "attn.proj", "ls2": "mlp.fc2"}
_ARCH_HINT = "build the backbone with the checkpoint's architecture (arch / depth, mlp_ratio, num_register_tokens)"


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """The first mapping of tensors found in the file (searching ``state_dict`` / ``model`` / ``teacher``)."""
    if not path.is_file():
        raise InputError(path, "pretrained weights file not found", "check the path given for the weights")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", *_TORCH_SUFFIXES):
        raise InputError(path, f"unsupported weights format {suffix or '(no suffix)'!r}",
                         "give a .safetensors, .pth, .pt or .bin file")
    try:
        content = load_file(str(path), device="cpu") if suffix == ".safetensors" \
            else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to parse the file is the file's fault; report it in one line
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise InputError(path, f"could not be read as {suffix} weights ({type(error).__name__}: {detail})",
                         "re-download the file or check that it is a PyTorch/safetensors checkpoint") from None
    while isinstance(content, Mapping):
        tensors = {str(key): value for key, value in content.items() if isinstance(value, Tensor)}
        if tensors:
            return tensors
        inner = next((content[key] for key in _CONTAINER_KEYS if isinstance(content.get(key), Mapping)), None)
        if inner is None:
            break
        content = inner
    raise InputError(path, "contains no state dict of tensors", "give a file holding ViT weights")


def _to_timm_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes and rename original-DINOv2 keys to timm ``VisionTransformer`` names."""
    changed = True
    while changed:
        changed = False
        for prefix in _SELECT_PREFIXES:
            if any(key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
                changed = True
        for prefix in _STRIP_PREFIXES:
            if any(key.startswith(prefix) for key in state):
                state = {key.removeprefix(prefix): value for key, value in state.items()}
                changed = True
    renamed = {}
    for key, value in state.items():
        key = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)
        if key == "register_tokens":
            key = "reg_token"
        if key == "mask_token" and value.ndim == 2:
            value = value.reshape(1, 1, -1)
        renamed[key] = value
    return renamed


def _check_architecture(path: Path, state: dict[str, Tensor], backbone: MaskableViT) -> None:
    """Raise InputError unless the checkpoint is a ViT of the backbone's width and depth."""
    patch_weight = state.get("patch_embed.proj.weight")
    if patch_weight is None or patch_weight.ndim != 4:
        examples = ", ".join(list(state)[:3])
        raise InputError(path, f"no ViT patch embedding 'patch_embed.proj.weight' [D, C, p, p] (keys: {examples}, ...)",
                         "give timm-format ViT weights (e.g. DINOv2 or timm vit_* models)")
    if patch_weight.shape[0] != backbone.embed_dim:
        raise InputError(path, f"checkpoint embed_dim {patch_weight.shape[0]} != model embed_dim {backbone.embed_dim}",
                         _ARCH_HINT)
    block_ids = {int(match.group(1)) for key in state if (match := _BLOCK_INDEX.match(key))}
    depth = max(block_ids) + 1 if block_ids else 0
    if depth != backbone.depth:
        raise InputError(path, f"checkpoint depth {depth} != model depth {backbone.depth}", _ARCH_HINT)


def _adapt_patch_embed(state: dict[str, Tensor], backbone: MaskableViT, adapted: list[str],
                       input_mean, input_std) -> None:
    """Channel-sum (folding the input normalisation) / resample ``patch_embed.proj.weight`` to ``[D, in_chans, p, p]``."""
    weight = state["patch_embed.proj.weight"].float()
    if (input_mean is not None and backbone.in_chans == 1 and weight.shape[1] == len(input_mean)
            and "patch_embed.proj.bias" in state):
        mean = torch.tensor(input_mean, dtype=torch.float32)
        std = torch.tensor(input_std, dtype=torch.float32)
        adapted.append(f"patch_embed.proj: {weight.shape[1]} -> 1 input channel, input normalisation "
                       f"mean={tuple(input_mean)} std={tuple(input_std)} folded in")
        state["patch_embed.proj.bias"] = (state["patch_embed.proj.bias"].float()
                                          - (weight.sum((2, 3)) * (mean / std)).sum(1))
        weight = (weight / std[None, :, None, None]).sum(1, keepdim=True)
    elif weight.shape[1] != backbone.in_chans:
        adapted.append(f"patch_embed.proj.weight: {weight.shape[1]} -> {backbone.in_chans} input channels")
        weight = adapt_input_conv(backbone.in_chans, weight, base_chans=weight.shape[1])
    patch = backbone.patch_size
    if tuple(weight.shape[-2:]) != (patch, patch):
        adapted.append(f"patch_embed.proj.weight: patch {tuple(weight.shape[-2:])} -> {(patch, patch)} (resampled)")
        weight = resample_patch_embed(weight, [patch, patch])
    state["patch_embed.proj.weight"] = weight


def _adapt_pos_embed(path: Path, state: dict[str, Tensor], backbone: MaskableViT, adapted: list[str]) -> None:
    """Fold prefix-token position embeddings into the tokens and resample the patch grid to the model's."""
    pos_embed = state["pos_embed"].float()  # [1, P + G*G, D], P in {0, cls, cls + registers}
    num_cls = 1 if "cls_token" in state else 0
    num_reg = state["reg_token"].shape[1] if "reg_token" in state else 0
    for num_prefix in dict.fromkeys((0, num_cls, num_cls + num_reg)):
        side = math.isqrt(max(pos_embed.shape[1] - num_prefix, 0))
        if side > 0 and side * side == pos_embed.shape[1] - num_prefix:
            break
    else:
        raise InputError(path, f"pos_embed of {pos_embed.shape[1]} tokens is not a square patch grid plus "
                               f"{num_cls} CLS and {num_reg} register tokens", "give square-grid ViT weights")
    if num_prefix >= 1:
        state["cls_token"] = state["cls_token"].float() + pos_embed[:, :1]
        adapted.append("cls_token: its position embedding added in")
    if num_prefix > 1:
        state["reg_token"] = state["reg_token"].float() + pos_embed[:, 1:num_prefix]
        adapted.append("reg_token: their position embeddings added in")
    patch_pos = pos_embed[:, num_prefix:]
    model_grid = list(backbone.vit.patch_embed.grid_size)
    if [side, side] != model_grid:
        adapted.append(f"pos_embed: grid {side}x{side} -> {model_grid[0]}x{model_grid[1]} (resampled)")
        patch_pos = resample_abs_pos_embed(patch_pos, new_size=model_grid, old_size=[side, side], num_prefix_tokens=0)
    state["pos_embed"] = patch_pos


def _adapt_layerscale(state: dict[str, Tensor], backbone: MaskableViT, adapted: list[str]) -> None:
    """Reconcile LayerScale presence between checkpoint and model without changing what the blocks compute."""
    model_state = backbone.vit.state_dict()
    for block in range(backbone.depth):
        for scale, projection in _LAYERSCALE_TARGETS.items():
            gamma_key = f"blocks.{block}.{scale}.gamma"
            if gamma_key in model_state and gamma_key not in state:
                state[gamma_key] = torch.ones_like(model_state[gamma_key])
                adapted.append(f"{gamma_key}: set to 1 (checkpoint has no LayerScale)")
            elif gamma_key in state and gamma_key not in model_state:
                gamma = state.pop(gamma_key).float()
                weight_key, bias_key = f"blocks.{block}.{projection}.weight", f"blocks.{block}.{projection}.bias"
                state[weight_key] = state[weight_key].float() * gamma[:, None]
                if bias_key in state:
                    state[bias_key] = state[bias_key].float() * gamma
                adapted.append(f"{gamma_key}: folded into {projection} (model has no LayerScale)")


def load_pretrained_backbone(backbone: MaskableViT, path: str, input_mean=IMAGENET_MEAN,
                             input_std=IMAGENET_STD) -> dict:
    """Load timm-format ViT weights from ``path`` into ``backbone`` (non-strict, after the adaptations above).

    ``input_mean``/``input_std``: per-channel normalisation the checkpoint was trained with (folded into the patch
    embedding when going from RGB to 1 channel); ``None`` to sum the channels as they are.

    Returns:
        ``{"missing": [...], "unexpected": [...], "adapted": [...]}``: backbone keys the file did not provide (they
        keep their initial values), file keys the backbone has no place for (e.g. a classifier head), and a line per
        adaptation.

    Raises:
        InputError: naming the file, if it is missing, unreadable, not a ViT, or of another width/depth/shape.
    """
    file_path = Path(path)
    state = _to_timm_names(_read_tensors(file_path))
    _check_architecture(file_path, state, backbone)
    adapted: list[str] = []
    _adapt_patch_embed(state, backbone, adapted, input_mean, input_std)
    if "pos_embed" in state:
        _adapt_pos_embed(file_path, state, backbone, adapted)
    _adapt_layerscale(state, backbone, adapted)

    model_state = backbone.state_dict()
    to_load = {(key if key == "mask_token" else f"vit.{key}"): value for key, value in state.items()}
    for key, value in to_load.items():
        if key in model_state and model_state[key].shape != value.shape:
            raise InputError(file_path, f"{key} has shape {list(value.shape)} in the file but "
                                        f"{list(model_state[key].shape)} in the model", _ARCH_HINT)
    result = backbone.load_state_dict(to_load, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys), "adapted": adapted}
