"""Per-slice saliency of a ViT encoder: last-layer CLS attention (per head and head-averaged), attention rollout,
and a head-aware gradient map. Token layout ``[CLS, reg_1 .. reg_R, patch_1 .. patch_N]`` (patches row-major over
the ``[h, w]`` grid); register tokens are never part of a map.

- CLS attention: the last block's softmax attention of the CLS query over the patch keys ``[S, H, N]``, renormalised
  to sum 1 over the patches (the share of the CLS token's patch attention; CLS and registers left out).
- Rollout (Abnar & Zuidema 2020): per block ``0.5 A + 0.5 I`` (A averaged over heads, rows renormalised),
  multiplied from the first block to the last; the CLS row over the patches, renormalised ``[S, N]``.
- Head-aware map ``[S, N]``: ``ReLU(sum_d (t_nd - m_d) * mean_α dy/dt_nd)``, the gradient taken at the tokens
  ``m + α (t - m)`` (integrated gradients from the reference ``m``, ``GRADIENT_STEPS`` midpoints ``α``), with ``t``
  the patch tokens entering the last block, ``m`` their mean over the slice's foreground patches (weighted by each
  patch's foreground share) and ``y`` the probe head's output, reached through each slice's CLS ‖ mean-patch
  feature. A gradient taken at ``t`` alone (one step at α = 1) vanishes where the final LayerNorm saturates, i.e.
  on the most extreme tokens — a bright tumour's; the path average keeps their contribution, and the signed
  attributions of a slice add up to ``G · (F(t) - F(m))`` (:func:`gradient_attributions`). The
  head supplies ``G`` ``[S, 2D]``, the gradient of ``y`` with respect to each slice's feature row (for
  attention-MIL: each slice's own output times its attention weight, see :mod:`.head_gradient`); the chain rule is
  finished here one batch of slices at a time.

Attention is recomputed from each block's ``qkv`` projection (a hook on the attention module's input), so fused
(flash) attention kernels need not be turned off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from braindino.errors import InputError


@dataclass
class SliceMaps:
    """``cls_attention`` ``[S, N]`` (heads averaged), ``cls_attention_heads`` ``[S, H, N]``, ``rollout`` ``[S, N]``,
    ``features`` ``[S, 2D]`` (CLS ‖ mean patch, the probe's slice features), ``gradient`` ``[S, N]`` or None."""

    cls_attention: np.ndarray
    cls_attention_heads: np.ndarray
    rollout: np.ndarray
    features: np.ndarray
    gradient: np.ndarray | None = None


def vit_of(encoder):
    """The timm ViT inside an Encoder; InputError for the pixel baseline (no tokens, no attention)."""
    vit = getattr(encoder.backbone, "vit", None)
    if vit is None or not hasattr(vit, "blocks"):
        raise InputError(encoder.name, "saliency needs a ViT encoder (attention and patch tokens)",
                         "pass a braindino model folder, random:<arch> or a timm ViT folder")
    return vit


def attention_probabilities(attention, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``[B, H, T, T]`` of a timm ``Attention`` module on its input ``x`` ``[B, T, C]``."""
    batch, tokens, _ = x.shape
    qkv = attention.qkv(x).reshape(batch, tokens, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _v = qkv.unbind(0)
    q, k = attention.q_norm(q), attention.k_norm(k)
    return ((q * attention.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


def cls_patch_attention(attention: torch.Tensor, prefix: int) -> torch.Tensor:
    """``[B, H, T, T]`` → the CLS row over the patch tokens ``[B, H, N]`` (tokens ``prefix..``), summing to 1."""
    row = attention[:, :, 0, prefix:]
    return row / row.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def attention_rollout(attentions: list[torch.Tensor], prefix: int) -> torch.Tensor:
    """Rollout of per-block ``[B, H, T, T]`` attentions → CLS over patches ``[B, N]``, summing to 1."""
    rolled = None
    for attention in attentions:
        mixed = 0.5 * attention.mean(dim=1) + 0.5 * torch.eye(attention.shape[-1], device=attention.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rolled = mixed if rolled is None else mixed @ rolled
    row = rolled[:, 0, prefix:]
    return row / row.sum(dim=-1, keepdim=True).clamp_min(1e-12)


class _Recorder:
    """Hooks on a ViT: every block's attention probabilities."""

    def __init__(self, vit):
        self.attentions, self.handles = [], []
        for block in vit.blocks:
            self.handles.append(block.attn.register_forward_pre_hook(self._record_attention))

    def _record_attention(self, module, args):
        with torch.no_grad():
            self.attentions.append(attention_probabilities(module, args[0]))

    def close(self):
        for handle in self.handles:
            handle.remove()


def _inputs(encoder, slices: np.ndarray) -> torch.Tensor:
    """``[b, size, size]`` preprocessed slices → ``[b, 1, input, input]`` on the encoder's device (as
    ``Encoder.embed_slices`` resizes them)."""
    x = torch.from_numpy(np.asarray(slices, dtype=np.float32))[:, None].to(encoder.device)
    if x.shape[-1] != encoder.input_size:
        x = F.interpolate(x, size=(encoder.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    return x


def attention_maps(encoder, slices: np.ndarray, batch_size: int = 32) -> SliceMaps:
    """CLS attention, rollout and slice features of ``slices`` ``[S, size, size]`` (no gradient map yet)."""
    vit = vit_of(encoder)
    prefix = vit.num_prefix_tokens
    heads, rolled, features = [], [], []
    for start in range(0, len(slices), batch_size):
        recorder = _Recorder(vit)
        try:
            with torch.no_grad():
                out = encoder.backbone(_inputs(encoder, slices[start:start + batch_size]))
        finally:
            recorder.close()
        heads.append(cls_patch_attention(recorder.attentions[-1], prefix).cpu())
        rolled.append(attention_rollout(recorder.attentions, prefix).cpu())
        features.append(torch.cat([out["cls"], out["mean_patch"]], dim=1).float().cpu())
    heads = torch.cat(heads).numpy()
    return SliceMaps(cls_attention=heads.mean(axis=1), cls_attention_heads=heads,
                     rollout=torch.cat(rolled).numpy(), features=torch.cat(features).numpy())


def patch_foreground(encoder, slices: np.ndarray) -> np.ndarray:
    """``[S, N]`` share of each patch's input pixels that are foreground (preprocessed slices are 0 outside it)."""
    foreground = _inputs(encoder, (np.asarray(slices) > 0).astype(np.float32))
    return F.avg_pool2d(foreground, encoder.patch_size).flatten(1).cpu().numpy()


GRADIENT_STEPS = 8       # midpoint steps of the path integral from the reference tokens to the slice's own


def _last_block_input(encoder, vit, x: torch.Tensor) -> torch.Tensor:
    """The tokens ``[b, T, C]`` entering the last block for input ``x`` (one no-grad forward pass)."""
    captured = []
    handle = vit.blocks[-1].register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            encoder.backbone(x)
    finally:
        handle.remove()
    return captured[0]


def _features_from_last_block(vit, tokens: torch.Tensor) -> torch.Tensor:
    """The slice features ``[b, 2D]`` (CLS ‖ mean patch, as ``ViTBackbone``) from the last block's input tokens:
    the rest of ``forward_features`` (last block, final norm)."""
    out = vit.norm(vit.blocks[-1](tokens))
    patch = out[:, vit.num_prefix_tokens:]
    mean_patch = patch.mean(dim=1)
    cls = out[:, 0] if vit.cls_token is not None else mean_patch
    return torch.cat([cls, mean_patch], dim=1).float()


def gradient_attributions(encoder, slices: np.ndarray, feature_gradients: np.ndarray, batch_size: int = 32,
                          steps: int = GRADIENT_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Signed per-patch attributions ``[S, N]`` of ``y ≈ sum_s G_s · F_s`` (``G`` ``[S, 2D]`` = dy/d(slice
    features)) and, per slice, ``G_s · (F_s(t) - F_s(reference))`` ``[S]`` — what they add up to (up to the
    midpoint rule's error). Attribution of patch ``n``: ``(t_n - m) · mean_α d(G·F)/dt_n`` at the tokens
    ``m + α (t - m)`` (``steps`` midpoints ``α``; every patch token moves from ``m`` to its own value together,
    prefix tokens stay), ``t`` the patch tokens entering the last block, ``m`` their mean over the slice's
    foreground patches (weighted by each patch's foreground share)."""
    foreground = torch.from_numpy(patch_foreground(encoder, slices))
    vit = vit_of(encoder)
    prefix = vit.num_prefix_tokens
    maps, totals = [], []
    for start in range(0, len(slices), batch_size):
        tokens = _last_block_input(encoder, vit, _inputs(encoder, slices[start:start + batch_size]))
        patches = tokens[:, prefix:].float()
        share = foreground[start:start + batch_size, :, None].to(patches.device)
        reference = (patches * share).sum(dim=1, keepdim=True) / share.sum(dim=1, keepdim=True).clamp_min(1e-6)
        delta = patches - reference                                                  # [b, N, C]
        weights = torch.as_tensor(feature_gradients[start:start + batch_size], dtype=torch.float32,
                                  device=tokens.device)
        summed = torch.zeros_like(delta)
        for alpha in (np.arange(steps) + 0.5) / steps:
            path = torch.cat([tokens[:, :prefix], (reference + float(alpha) * delta).to(tokens.dtype)], dim=1)
            path.requires_grad_(True)
            with torch.enable_grad():
                (gradient,) = torch.autograd.grad((weights * _features_from_last_block(vit, path)).sum(), path)
            summed += gradient[:, prefix:].float()
        maps.append((delta * summed / steps).sum(dim=-1).cpu())
        with torch.no_grad():
            base = torch.cat([tokens[:, :prefix], reference.expand_as(patches).to(tokens.dtype)], dim=1)
            difference = _features_from_last_block(vit, tokens) - _features_from_last_block(vit, base)
            totals.append((weights * difference).sum(dim=1).cpu())
    return torch.cat(maps).numpy(), torch.cat(totals).numpy()


def gradient_map(encoder, slices: np.ndarray, feature_gradients: np.ndarray, batch_size: int = 32,
                 steps: int = GRADIENT_STEPS) -> np.ndarray:
    """Head-aware map ``[S, N]`` of ``slices`` ``[S, size, size]`` given ``feature_gradients`` ``G`` ``[S, 2D]``
    (dy/d(slice features)): the positive part of :func:`gradient_attributions`."""
    return np.maximum(gradient_attributions(encoder, slices, feature_gradients, batch_size, steps)[0], 0.0)
