"""ViT backbone for DINOv2 / iBOT pretraining: a timm ``VisionTransformer`` plus an iBOT mask token.

The transformer itself (patch embedding, position embeddings, blocks, final norm) is timm's, held as ``self.vit``, so
timm-format weights load into it directly (see :mod:`braindino.models.init_from`). This module adds only what
self-supervised pretraining needs on top:

- a learnable ``mask_token`` that replaces the embeddings of masked patches *before* position embeddings are added
  (iBOT: the student must predict the teacher's tokens of patches it cannot see, but still knows where they are);
- outputs split into the CLS token, the register tokens and the patch tokens.

Layout: the CLS token and ``R`` register tokens are prepended to the ``N`` patch tokens; position embeddings cover the
patch grid only (``no_embed_class=True``, as timm does for DINOv2-with-registers), so a token sequence is
``[CLS, reg_1 .. reg_R, patch_1 .. patch_N]`` with patches in row-major order of the ``[H/p, W/p]`` grid. Position
embeddings are resampled on the fly (``dynamic_img_size=True``), so any image size divisible by the patch size works.
"""
from __future__ import annotations

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

PRESETS: dict[str, dict[str, int]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


class MaskableViT(nn.Module):
    """A timm ViT with CLS + register tokens and an iBOT mask token.

    Args:
        arch: one of :data:`PRESETS` (width, depth, heads).
        patch_size: side of a square patch in pixels.
        img_size: nominal training image side; sets the stored position-embedding grid ``img_size / patch_size``.
            Other sizes are handled by resampling that grid.
        in_chans: image channels (1 for MRI slices).
        num_register_tokens: extra learnable tokens (Darcet et al. 2024, "Vision Transformers Need Registers").
        drop_path_rate: stochastic-depth rate of the last block (linearly increasing from 0 over the blocks).
        layerscale_init: initial LayerScale value; ``None`` disables LayerScale.
        depth: number of blocks, overriding the preset's (e.g. tiny test models).
        mlp_ratio: MLP hidden width / embedding width.
        qkv_bias: bias on the query/key/value projection.
        qk_norm: LayerNorm on queries and keys per head.
    """

    def __init__(
        self,
        arch: str = "vit_small",
        patch_size: int = 16,
        img_size: int = 224,
        in_chans: int = 1,
        num_register_tokens: int = 4,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = 1e-5,
        depth: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
    ):
        super().__init__()
        if arch not in PRESETS:
            raise ValueError(f"unknown ViT arch {arch!r}; choose one of {sorted(PRESETS)}")
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        preset = PRESETS[arch]
        self.arch = arch
        self.embed_dim: int = preset["embed_dim"]
        self.num_heads: int = preset["num_heads"]
        self.depth: int = preset["depth"] if depth is None else depth
        self.patch_size: int = patch_size
        self.in_chans: int = in_chans
        self.num_register_tokens: int = num_register_tokens
        self.vit = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            init_values=layerscale_init,
            class_token=True,
            reg_tokens=num_register_tokens,
            no_embed_class=True,
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (less memory, ~30% more compute)."""
        self.vit.set_grad_checkpointing(enable)

    def forward_features(self, images: Tensor, masks: Tensor | None = None) -> dict[str, Tensor]:
        """Encode images, optionally with some patches masked.

        Args:
            images: ``[B, C, H, W]`` with ``H`` and ``W`` divisible by ``patch_size``.
            masks: ``[B, N]`` bool over the ``N = (H/p) * (W/p)`` patches in row-major order (``True`` = masked:
                its patch embedding is replaced by ``mask_token``), or ``None`` for no masking.

        Returns:
            ``{"cls": [B, D], "patch": [B, N, D], "registers": [B, R, D]}``, all after the final LayerNorm.
        """
        vit = self.vit
        tokens = vit.patch_embed(images)  # [B, H/p, W/p, D]
        if masks is not None:
            batch, grid_h, grid_w, dim = tokens.shape
            if masks.dtype != torch.bool:
                raise TypeError(f"masks must be a bool tensor, got {masks.dtype}")
            if tuple(masks.shape) != (batch, grid_h * grid_w):
                raise ValueError(
                    f"masks must have shape [B, N] = [{batch}, {grid_h * grid_w}] for images of "
                    f"{tuple(images.shape[-2:])} and patch size {self.patch_size}, got {tuple(masks.shape)}"
                )
            mask_token = self.mask_token.to(tokens.dtype).view(1, 1, 1, dim)
            tokens = torch.where(masks.view(batch, grid_h, grid_w, 1), mask_token, tokens)
        tokens = vit._pos_embed(tokens)  # [B, 1 + R + N, D]: prefix tokens concatenated, patch grid pos-embedded
        tokens = vit.patch_drop(tokens)
        tokens = vit.norm_pre(tokens)
        if vit.grad_checkpointing and not torch.jit.is_scripting():
            tokens = checkpoint_seq(vit.blocks, tokens)
        else:
            tokens = vit.blocks(tokens)
        tokens = vit.norm(tokens)
        first_patch = 1 + self.num_register_tokens
        return {
            "cls": tokens[:, 0],
            "registers": tokens[:, 1:first_patch],
            "patch": tokens[:, first_patch:],
        }

    def forward(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` images -> ``[B, D]`` CLS embeddings (what a frozen encoder serves)."""
        return self.forward_features(images)["cls"]


def build_backbone(arch: str, **kwargs) -> MaskableViT:
    """Build a :class:`MaskableViT` of preset ``arch``; ``kwargs`` go to its constructor."""
    return MaskableViT(arch=arch, **kwargs)
