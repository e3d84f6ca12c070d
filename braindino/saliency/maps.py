"""Per-slice saliency of a ViT encoder: last-layer CLS attention (per head and head-averaged), attention rollout,
and a head-aware gradient map. Token layout ``[CLS, reg_1 .. reg_R, patch_1 .. patch_N]`` (patches row-major over
the ``[h, w]`` grid); register tokens are never part of a map.

- CLS attention: the last block's softmax attention of the CLS query over the patch keys ``[S, H, N]``, renormalised
  to sum 1 over the patches (the share of the CLS token's patch attention; CLS and registers left out).
- Rollout (Abnar & Zuidema 2020): per block ``0.5 A + 0.5 I`` (A averaged over heads, rows renormalised),
  multiplied from the first block to the last; the CLS row over the patches, renormalised ``[S, N]``.
- Head-aware map ``[S, N]``: ``ReLU(sum_d (t_nd - m_d) * dy/dt_nd)`` with ``t`` the patch tokens entering
  the last block, ``m`` their mean over the slice's foreground patches (weighted by each patch's foreground share) and ``y`` the probe head's output, reached through each slice's CLS ‖ mean-patch feature. The
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
    """Hooks on a ViT: every block's attention probabilities; optionally the last block's input made a leaf that
    requires grad (``last_input``)."""

    def __init__(self, vit, track_gradient: bool):
        self.attentions, self.last_input, self.handles = [], None, []
        for block in vit.blocks:
            self.handles.append(block.attn.register_forward_pre_hook(self._record_attention))
        if track_gradient:
            self.handles.append(vit.blocks[-1].register_forward_pre_hook(self._leaf))

    def _record_attention(self, module, args):
        with torch.no_grad():
            self.attentions.append(attention_probabilities(module, args[0]))

    def _leaf(self, module, args):
        self.last_input = args[0].detach().requires_grad_(True)
        return (self.last_input, *args[1:])

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
        recorder = _Recorder(vit, track_gradient=False)
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


def gradient_map(encoder, slices: np.ndarray, feature_gradients: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Head-aware map ``[S, N]`` of ``slices`` ``[S, size, size]`` given ``feature_gradients`` ``G`` ``[S, 2D]``
    (dy/d(slice features)): per batch, backpropagate ``sum(G * features)`` to the last block's input tokens."""
    foreground = torch.from_numpy(patch_foreground(encoder, slices))
    vit = vit_of(encoder)
    prefix = vit.num_prefix_tokens
    maps = []
    for start in range(0, len(slices), batch_size):
        recorder = _Recorder(vit, track_gradient=True)
        try:
            with torch.enable_grad():
                out = encoder.backbone(_inputs(encoder, slices[start:start + batch_size]))
                features = torch.cat([out["cls"], out["mean_patch"]], dim=1).float()
                weights = torch.as_tensor(feature_gradients[start:start + batch_size], dtype=torch.float32,
                                          device=features.device)
                (gradient,) = torch.autograd.grad((weights * features).sum(), recorder.last_input)
        finally:
            recorder.close()
        tokens = recorder.last_input.detach()[:, prefix:].float()
        gradient = gradient[:, prefix:].float()
        share = foreground[start:start + batch_size, :, None].to(tokens.device)
        reference = (tokens * share).sum(dim=1, keepdim=True) / share.sum(dim=1, keepdim=True).clamp_min(1e-6)
        centred = tokens - reference
        maps.append((centred * gradient).sum(dim=-1).clamp_min(0).cpu())
    return torch.cat(maps).numpy()
