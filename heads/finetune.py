"""Fine-tuning a pretrained ViT slice encoder beside linear probing (the BrainIAC protocol): the last K transformer
blocks unfrozen, or LoRA adapters (Hu et al., ICLR 2022) on every block's attention.

:class:`ViTSliceBackbone` wraps the ``ViTBackbone`` of a braindino :class:`~braindino.encoder.Encoder` (a timm
``VisionTransformer`` with its channel handling) as the trainable slice network of
:class:`heads.slice_network.SliceNetworkHead`: ``x`` ``[B, 1, S, S]`` (slices in [0, 1] at the encoder's input size)
→ CLS ‖ mean patch token ``[B, 2D]``, the same slice features a frozen probe reads.

- ``mode="last"``, ``amount=K``: every parameter frozen except the last K blocks and the final norm.
  :meth:`ViTSliceBackbone.frozen` runs the frozen prefix (channel handling, patch embedding, position embedding,
  blocks ``[:-K]``) once per slice → tokens ``[B, N, D]``; ``forward`` runs blocks ``[-K:]`` and the norm.
- ``mode="lora"``, ``amount=R``: every ViT parameter frozen; :class:`LoRALinear` adapters of rank R on each block's
  ``attn.qkv`` and ``attn.proj`` (their ``B`` starts at 0, so the untrained network is the pretrained one).
  :meth:`frozen` is the channel handling only; ``forward`` the whole ViT.

No file I/O: the caller loads the encoder and hands over a copy of its backbone.
"""

import math

import torch
from torch import nn

FINETUNE_MODES = ("last", "lora")


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / rank) · (x Aᵀ) Bᵀ`` for ``x`` ``[..., in]``: ``base`` (an ``nn.Linear``) frozen,
    ``A`` ``[rank, in]`` Kaiming-uniform, ``B`` ``[out, rank]`` zeros (the adapter starts as a no-op)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank = int(rank)
        self.scaling = float(alpha if alpha is not None else rank) / self.rank
        self.lora_a = nn.Parameter(torch.empty(self.rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, self.rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling


def add_lora(vit: nn.Module, rank: int, alpha: float | None = None, targets=("qkv", "proj")) -> list[LoRALinear]:
    """Replace ``blocks[i].attn.<target>`` of ``vit`` (a timm VisionTransformer) by :class:`LoRALinear` wrappers of
    rank ``rank`` (their ``A`` drawn from the global torch RNG); returns the adapters."""
    adapters = []
    for block in vit.blocks:
        for name in targets:
            adapter = LoRALinear(getattr(block.attn, name), rank, alpha)
            setattr(block.attn, name, adapter)
            adapters.append(adapter)
    return adapters


class ViTSliceBackbone(nn.Module):
    """A ``ViTBackbone`` (``.vit``, ``.replicate``, ``.mean``, ``.std`` buffers) as a trainable slice encoder:
    ``forward(frozen(x))`` = CLS ‖ mean patch ``[B, 2D]`` of ``x`` ``[B, 1, S, S]``; see the module docstring for
    what ``mode`` / ``amount`` train. ``out_features`` = 2D."""

    def __init__(self, backbone: nn.Module, mode: str, amount: int):
        super().__init__()
        if mode not in FINETUNE_MODES:
            raise ValueError(f"mode must be one of {FINETUNE_MODES}, got {mode!r}")
        vit = backbone.vit
        depth = len(vit.blocks)
        if mode == "last" and not 1 <= amount <= depth:
            raise ValueError(f"last:{amount} needs 1..{depth} blocks (the ViT has {depth})")
        self.backbone, self.mode, self.amount = backbone.requires_grad_(False), mode, int(amount)
        self.out_features = 2 * vit.embed_dim
        if mode == "last":
            self.split = depth - self.amount
            for module in (*vit.blocks[self.split:], vit.norm):
                module.requires_grad_(True)
        else:
            self.split = 0
            self.adapters = nn.ModuleList(add_lora(vit, self.amount))

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        return (x.expand(-1, b.replicate, -1, -1) - b.mean.to(x.dtype)) / b.std.to(x.dtype)

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, 1, S, S]`` → what ``forward`` takes: tokens ``[B, N, D]`` after the frozen blocks (last:K), or
        the normalised slices ``[B, C, S, S]`` (lora)."""
        x = self._channels(x)
        if self.mode == "lora":
            return x
        vit = self.backbone.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for block in vit.blocks[:self.split]:
            x = block(x)
        return x

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        vit = self.backbone.vit
        if self.mode == "lora":
            tokens = vit.forward_features(z)
        else:
            tokens = z
            for block in vit.blocks[self.split:]:
                tokens = block(tokens)
            tokens = vit.norm(tokens)
        patch = tokens[:, vit.num_prefix_tokens:]
        mean_patch = patch.mean(dim=1)
        cls = tokens[:, 0] if vit.cls_token is not None else mean_patch
        return torch.cat([cls, mean_patch], dim=1)

    def train(self, mode: bool = True):
        """Only the trained part switches to training mode (a frozen block's dropout stays off)."""
        super().train(False)
        if mode:
            vit = self.backbone.vit
            for module in ((*vit.blocks[self.split:], vit.norm) if self.mode == "last" else (vit,)):
                module.train(True)
        self.training = mode
        return self
