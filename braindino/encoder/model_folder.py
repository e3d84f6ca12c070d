"""Model folders: timm's hub format (``config.json`` + ``model.safetensors``), plus braindino's own block.

``timm.create_model("local-dir:MODEL_DIR", pretrained=True)`` builds a braindino model with no braindino installed:
``config.json`` holds ``architecture`` (a timm ViT name), ``model_args`` (everything that differs from that name's
defaults: patch size, depth, registers, ``in_chans=1``, ``no_embed_class``, ``dynamic_img_size``, ...) and
``pretrained_cfg`` (``input_size [1, S, S]``, mean 0, std 1: the model takes [0, 1] slices as they are). Its
``braindino`` block holds ``preprocessing`` (a :class:`~braindino.ingest.PreprocessConfig` as a dict) and
``provenance`` (from the training checkpoint). A folder without that block is read as a natural-image timm ViT.
Weights are only ever read from safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from braindino.errors import InputError

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
HEADS = "heads.safetensors"
PICKLED_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
EXPORT_HINT = "export a braindino model with: braindino export --checkpoint RUN --out MODEL_DIR"


def timm_config(arch: str, embed_dim: int, depth: int, num_heads: int, patch_size: int, img_size: int,
                num_register_tokens: int, layerscale_init, preprocessing: dict, provenance: dict) -> dict:
    """The ``config.json`` of a 1-channel braindino ViT (token layout of :class:`braindino.models.MaskableViT`)."""
    model_args = dict(img_size=img_size, patch_size=patch_size, in_chans=1, num_classes=0, global_pool="token",
                      embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True,
                      qk_norm=False, init_values=layerscale_init, class_token=True, reg_tokens=num_register_tokens,
                      no_embed_class=True, dynamic_img_size=True)
    return {
        "architecture": f"{arch}_patch16_224",
        "num_classes": 0,
        "num_features": embed_dim,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [1, img_size, img_size], "fixed_input_size": False, "interpolation": "bilinear",
            "crop_pct": 1.0, "crop_mode": "center", "mean": [0.0], "std": [1.0], "num_classes": 0,
            "first_conv": "patch_embed.proj", "classifier": "head", "license": "see the training data",
        },
        "braindino": {"format_version": 1, "preprocessing": preprocessing, "provenance": provenance},
    }


def read_config(folder) -> dict:
    """``folder/config.json`` as a dict; InputError for a missing folder, a pickle-only folder or bad JSON."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "model folder not found", EXPORT_HINT)
    path = folder / CONFIG_JSON
    if not (folder / WEIGHTS).is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
        cause = (f"holds only pickled weights ({', '.join(pickled)}), which braindino never loads" if pickled
                 else f"has no {WEIGHTS}")
        raise InputError(folder, cause, "convert the weights to model.safetensors (safetensors.torch.save_file) "
                                        "or " + EXPORT_HINT)
    if not path.is_file():
        raise InputError(folder, f"has no {CONFIG_JSON}", EXPORT_HINT)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(path, f"unreadable JSON ({type(err).__name__})", EXPORT_HINT) from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise InputError(path, "not a timm model config (no 'architecture')", EXPORT_HINT)
    return config


def build_vit(folder, config: dict) -> VisionTransformer:
    """The folder's timm ViT with its safetensors weights loaded strictly (classifier head dropped)."""
    folder = Path(folder)
    args = {**config.get("model_args", {}), "num_classes": 0}
    try:
        model = timm.create_model(config["architecture"], pretrained=False, **args)
    except Exception as err:   # unknown architecture or arguments it does not take
        raise InputError(folder / CONFIG_JSON, f"timm cannot build {config['architecture']!r} "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
                         "check architecture and model_args in config.json") from None
    if not isinstance(model, VisionTransformer):
        raise InputError(folder / CONFIG_JSON, f"{config['architecture']!r} is not a timm VisionTransformer",
                         "braindino encoders are ViTs; pick a vit_* model")
    try:
        weights = load_file(str(folder / WEIGHTS), device="cpu")
    except Exception as err:
        raise InputError(folder / WEIGHTS, f"unreadable safetensors ({type(err).__name__})",
                         "re-export or re-download the weights") from None
    weights = {name: tensor for name, tensor in weights.items() if not name.startswith("head.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:200]
        raise InputError(folder / WEIGHTS, f"weights do not match config.json ({detail})",
                         "export the model again; weights and config.json must come from the same model") from None
    return model.eval()


def write_model_folder(folder, config: dict, weights: dict[str, torch.Tensor],
                       heads: dict[str, torch.Tensor] | None = None, heads_metadata: dict | None = None) -> None:
    """Atomically write ``config.json``, ``model.safetensors`` (and ``heads.safetensors`` with string
    ``heads_metadata``, e.g. ``aliases``: JSON of {name: name it shares weights with}) into ``folder``."""
    from safetensors.torch import save_file

    from braindino.atomic import atomic_path, atomic_write_json

    folder = Path(folder)
    for name, tensors, extra in ((WEIGHTS, weights, {}), (HEADS, heads, heads_metadata or {})):
        if tensors is not None:
            with atomic_path(folder / name) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                          metadata={"format": "pt", **extra})
    if heads is None:
        (folder / HEADS).unlink(missing_ok=True)   # never leave heads of an earlier export beside new weights
    atomic_write_json(folder / CONFIG_JSON, config)
