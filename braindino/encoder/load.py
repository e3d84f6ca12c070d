"""``load_encoder(spec)``: every kind of frozen encoder behind one :class:`~braindino.encoder.Encoder`.

Specs:

- a braindino model folder (``braindino export``): 1-channel ViT, its own preprocessing and input size;
- a natural-image timm ``local-dir`` ViT folder (``config.json`` + ``model.safetensors``, no ``braindino``
  block): the grey slice is replicated to 3 channels and normalised with the model's ``pretrained_cfg`` mean/std,
  at the model's own input size; preprocessing from ``like`` or the default :class:`PreprocessConfig`;
- ``random:<arch>[:seed]`` (``arch`` in :data:`braindino.models.PRESETS`): a randomly initialised braindino ViT
  (patch 16, 4 registers, LayerScale 1e-5, 224 px) — with ``like``, its preprocessing, input size, patch size,
  registers, depth and image size are copied from that encoder;
- ``pixels[:grid]`` (default grid 8): the non-deep baseline of :class:`~braindino.encoder.backbones.PixelsBackbone`
  — with ``like``, its preprocessing and input size (rounded to a multiple of ``grid``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from braindino.encoder.backbones import PixelsBackbone, ViTBackbone
from braindino.encoder.encoder import Encoder
from braindino.encoder.model_folder import build_vit, read_config
from braindino.errors import InputError
from braindino.ingest import PreprocessConfig

DEFAULT_PIXEL_GRID = 8
RANDOM_DEFAULTS = dict(patch_size=16, img_size=224, reg_tokens=4, init_values=1e-5)


def load_encoder(spec, device=None, like: Encoder | None = None) -> Encoder:
    """Build the encoder named by ``spec`` (see the module docstring) on ``device`` (default cuda > mps > cpu)."""
    text = str(spec)
    if text.startswith("random:"):
        return _random_encoder(text, like, device)
    if text == "pixels" or text.startswith("pixels:"):
        return _pixels_encoder(text, like, device)
    return _folder_encoder(Path(text), like, device)


def _vit_args(vit) -> dict:
    """timm ``VisionTransformer`` constructor arguments that describe ``vit`` (enough to rebuild it)."""
    return dict(img_size=vit.patch_embed.img_size[0], patch_size=vit.patch_embed.patch_size[0],
                depth=len(vit.blocks), reg_tokens=vit.num_reg_tokens)


def _rebuilder(architecture: str, args: dict, mean=None, std=None):
    """``seed -> ViTBackbone`` with random weights of the same architecture."""
    import timm

    def rebuild(seed: int) -> ViTBackbone:
        torch.manual_seed(seed)
        return ViTBackbone(timm.create_model(architecture, pretrained=False, **args), mean, std)
    return rebuild


def _folder_encoder(folder: Path, like: Encoder | None, device) -> Encoder:
    config = read_config(folder)
    vit = build_vit(folder, config)
    args = {**config.get("model_args", {}), "num_classes": 0}
    own = config.get("braindino")
    if own is not None:
        preprocessing = PreprocessConfig.from_dict(own["preprocessing"])
        input_size = int(config["pretrained_cfg"]["input_size"][-1])
        backbone, rebuild = ViTBackbone(vit), _rebuilder(config["architecture"], args)
    else:
        cfg = config.get("pretrained_cfg", config)
        mean, std = tuple(cfg.get("mean", (0.0,) * 3)), tuple(cfg.get("std", (1.0,) * 3))
        input_size = int(cfg.get("input_size", (3, 224, 224))[-1])
        preprocessing = like.preprocessing if like is not None else PreprocessConfig()
        backbone, rebuild = ViTBackbone(vit, mean, std), _rebuilder(config["architecture"], args, mean, std)
    return Encoder(str(folder), backbone, preprocessing, input_size, vit.patch_embed.patch_size[0], rebuild,
                   device)


def _random_encoder(spec: str, like: Encoder | None, device) -> Encoder:
    from braindino.models import PRESETS

    _, arch, *rest = spec.split(":")
    if arch not in PRESETS or len(rest) > 1 or (rest and not rest[0].isdigit()):
        raise InputError(spec, f"unknown random encoder (architectures: {', '.join(sorted(PRESETS))})",
                         "write random:<arch>[:seed], e.g. random:vit_small:0")
    seed = int(rest[0]) if rest else 0
    args = dict(RANDOM_DEFAULTS, depth=PRESETS[arch]["depth"])
    preprocessing, input_size = PreprocessConfig(), RANDOM_DEFAULTS["img_size"]
    if like is not None:
        preprocessing, input_size = like.preprocessing, like.input_size
        vit = getattr(like.backbone, "vit", None)
        args.update(_vit_args(vit) if vit is not None else {"img_size": input_size})
    args.update(in_chans=1, num_classes=0, global_pool="token", class_token=True, no_embed_class=True,
                dynamic_img_size=True)
    rebuild = _rebuilder(f"{arch}_patch16_224", args)
    return Encoder(spec, rebuild(seed), preprocessing, input_size, args["patch_size"], rebuild, device)


def _pixels_encoder(spec: str, like: Encoder | None, device) -> Encoder:
    grid_text = spec.partition(":")[2] or str(DEFAULT_PIXEL_GRID)
    if not grid_text.isdigit() or int(grid_text) < 1:
        raise InputError(spec, "the pixel grid must be a positive integer", "write pixels or pixels:<grid>, "
                                                                               "e.g. pixels:8")
    grid = int(grid_text)
    preprocessing = like.preprocessing if like is not None else PreprocessConfig()
    base = like.input_size if like is not None else preprocessing.size
    input_size = grid * max(1, round(base / grid))
    backbone = PixelsBackbone(grid)
    return Encoder(spec, backbone, preprocessing, input_size, input_size // grid, lambda seed: PixelsBackbone(grid),
                   device)
