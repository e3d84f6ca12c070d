"""Choice of the kernel that computes self-attention in timm ViT blocks: PyTorch SDPA or xFormers.

Both backends use the same parameters (``qkv``, ``q_norm``/``k_norm``, ``proj``), so a state dict is interchangeable
and switching backends never changes what a model computes, only how (within floating-point rounding). The switch
swaps the class of each timm ``Attention`` module in place between timm's own class (SDPA path) and
:class:`XFormersAttention`, a subclass that only replaces the attention product; ``copy.deepcopy`` (used to create
the EMA teacher) keeps the chosen backend.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch
from timm.layers import Attention
from torch import Tensor, nn

BACKENDS = ("auto", "sdpa", "xformers")


@functools.cache
def _import_xformers_ops() -> ModuleType | None:
    """``xformers.ops`` if it imports cleanly (a build for another torch can fail with OSError/RuntimeError)."""
    try:
        import xformers.ops
    except (ImportError, OSError, RuntimeError):
        return None
    return xformers.ops


def xformers_available() -> bool:
    """True when xformers is importable and a CUDA device is available (its kernels are CUDA-only)."""
    return torch.cuda.is_available() and _import_xformers_ops() is not None


class XFormersAttention(Attention):
    """timm ``Attention`` whose softmax(QK^T / sqrt(d)) V product runs in ``xformers.ops.memory_efficient_attention``.

    Calls with an ``attn_mask`` or ``is_causal`` fall back to timm's SDPA path (the ViT here never passes them).
    """

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """``[B, N, C]`` tokens -> ``[B, N, C_out]``."""
        if attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        batch, num_tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        # xformers wants [B, N, heads, head_dim]; q_norm/k_norm normalise the last (head_dim) axis either way.
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        # Under autocast q_norm/k_norm (LayerNorm) return fp32 while v is bf16/fp16; xformers needs one dtype.
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        out = _import_xformers_ops().memory_efficient_attention(
            q, k, v, p=self.attn_drop.p if self.training else 0.0, scale=self.scale
        )
        out = self.norm(out.reshape(batch, num_tokens, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def set_attention_backend(model: nn.Module, backend: str = "auto") -> str:
    """Make every timm ``Attention`` block in ``model`` use ``backend``; returns the backend actually used.

    ``"auto"`` picks ``"xformers"`` when :func:`xformers_available`, else ``"sdpa"``. ``"sdpa"`` is timm's attention
    with ``fused_attn=True`` (``torch.nn.functional.scaled_dot_product_attention``). ``"xformers"`` raises
    ``RuntimeError`` when xformers or CUDA is missing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = "xformers" if xformers_available() else "sdpa"
    if backend == "xformers" and not xformers_available():
        missing = "xformers is not installed or failed to import" if _import_xformers_ops() is None \
            else "CUDA is not available (xformers kernels need a GPU)"
        raise RuntimeError(
            f"attention backend 'xformers' was requested but {missing}; "
            "use backend 'sdpa' or 'auto', or install the xformers build matching your torch (pip install xformers)"
        )
    attention_class = XFormersAttention if backend == "xformers" else Attention
    switched = 0
    for module in model.modules():
        if type(module) in (Attention, XFormersAttention):
            module.__class__ = attention_class
            module.fused_attn = True
            switched += 1
    if switched == 0:
        raise ValueError(f"{type(model).__name__} contains no timm Attention blocks to switch to {backend!r}")
    return backend
