"""Optimizer parameter groups: no weight decay on biases/norms/tokens, layer-wise learning-rate decay.

Layer ids inside a :class:`~braindino.models.vit.MaskableViT` of depth ``L``: 0 for the patch embedding, position
embedding and the CLS / register / mask tokens; ``i + 1`` for block ``i``; ``L + 1`` for the final norm. Every
parameter outside a backbone (DINO / iBOT heads) also counts as layer ``L + 1``. A parameter's learning-rate
multiplier is ``layer_decay ** (L + 1 - layer_id)`` (1 for the top, smallest for the embeddings), times
``patch_embed_lr_multiplier`` for the patch embedding.
"""
from __future__ import annotations

import re

from torch import nn

from braindino.models.vit import MaskableViT

_BLOCK_PATTERN = re.compile(r"^vit\.blocks\.(\d+)\.")
_EMBEDDING_PREFIXES = ("vit.patch_embed.", "vit.pos_embed", "vit.cls_token", "vit.reg_token", "mask_token")
# Token-like tensors of shape [1, T, D]: learned inputs, not weights of a map, so they are not shrunk.
_NO_DECAY_TENSORS = ("vit.pos_embed", "vit.cls_token", "vit.reg_token", "mask_token")


def _backbone_layer_id(name: str, depth: int) -> int:
    """Layer id of parameter ``name`` (relative to a MaskableViT) in a backbone of ``depth`` blocks."""
    block = _BLOCK_PATTERN.match(name)
    if block:
        return int(block.group(1)) + 1
    if name.startswith(_EMBEDDING_PREFIXES):
        return 0
    return depth + 1


def _decays(local_name: str, parameter: nn.Parameter) -> bool:
    """Weight decay applies to matrices and kernels only: not biases, norm scales, LayerScale gammas or tokens."""
    return parameter.ndim > 1 and not local_name.startswith(_NO_DECAY_TENSORS)


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    patch_embed_lr_multiplier: float = 1.0,
) -> list[dict]:
    """Split the trainable parameters of ``model`` into optimizer groups.

    Args:
        model: a :class:`MaskableViT`, or any module containing MaskableViT backbones and heads.
        weight_decay: base weight decay; each group gets ``"weight_decay" = weight_decay * wd_multiplier``.
        layer_decay: per-layer learning-rate decay factor (1.0 = none).
        patch_embed_lr_multiplier: extra learning-rate factor for the patch embedding.

    Returns:
        One dict per distinct (layer, decay, patch-embed) combination with keys ``"params"``, ``"lr_multiplier"``,
        ``"wd_multiplier"`` (1.0 or 0.0), ``"weight_decay"`` and ``"name"``. Parameters with ``requires_grad=False``
        at call time are left out, so freeze layers by zeroing their gradients, not by toggling ``requires_grad``
        before this call.
    """
    # id(parameter) -> (group label, lr multiplier, decays) for every backbone parameter
    backbone_parameters: dict[int, tuple[str, float, bool]] = {}
    for module in model.modules():
        if isinstance(module, MaskableViT):
            for local_name, parameter in module.named_parameters():
                layer_id = _backbone_layer_id(local_name, module.depth)
                lr_multiplier = layer_decay ** (module.depth + 1 - layer_id)
                label = f"layer_{layer_id}"
                if local_name.startswith("vit.patch_embed."):
                    lr_multiplier *= patch_embed_lr_multiplier
                    label += "_patch_embed"
                backbone_parameters[id(parameter)] = (label, lr_multiplier, _decays(local_name, parameter))

    groups: dict[tuple[str, float], dict] = {}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        # Heads outside every backbone sit at the top layer: full learning rate.
        label, lr_multiplier, decays = backbone_parameters.get(id(parameter), ("head", 1.0, parameter.ndim > 1))
        wd_multiplier = 1.0 if decays else 0.0
        group_name = f"{label}_{'wd' if decays else 'no_wd'}"
        group = groups.setdefault((group_name, lr_multiplier), {
            "params": [],
            "lr_multiplier": lr_multiplier,
            "wd_multiplier": wd_multiplier,
            "weight_decay": weight_decay * wd_multiplier,
            "name": group_name,
        })
        group["params"].append(parameter)
    return list(groups.values())
