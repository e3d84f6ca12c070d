"""``Encoder``: one interface over every frozen slice encoder (braindino model, random ViT, natural-image ViT,
pixel baseline). Built by :func:`braindino.encoder.load_encoder`.

Slices arrive as ``[B, 1, size, size]`` in [0, 1] (``size = preprocessing.size``), are resized to ``input_size``
(bilinear, antialiased; nothing is done when the sizes are equal) and run through the backbone: in bf16 autocast
on CUDA, fp32 elsewhere. Outputs are float32 on the CPU.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from braindino.encoder.backbones import weights_digest
from braindino.encoder.volume import VolumeEmbedding, ingest_source, volume_geometry
from braindino.ingest import PreprocessConfig

DEFAULT_BATCH = 64


def default_device() -> torch.device:
    """cuda > mps > cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Encoder:
    """A frozen slice encoder.

    Attributes: ``name`` (the spec), ``fingerprint`` (16 hex over weights + preprocessing + input handling),
    ``preprocessing`` (PreprocessConfig), ``input_size``, ``patch_size``, ``embed_dim``, ``grid`` (patch grid
    ``(h, w)`` at ``input_size``), ``device``, ``backbone`` (the ``nn.Module``), ``rebuild`` (``seed -> backbone``
    of the same architecture with random weights, used by :meth:`random_like`).
    """

    def __init__(self, name: str, backbone: nn.Module, preprocessing: PreprocessConfig, input_size: int,
                 patch_size: int, rebuild, device=None):
        self.name = name
        self.backbone = backbone.eval().requires_grad_(False)
        self.preprocessing = preprocessing
        self.input_size = int(input_size)
        self.patch_size = int(patch_size)
        self.embed_dim = int(backbone.embed_dim)
        self.grid = (self.input_size // self.patch_size,) * 2
        self.rebuild = rebuild
        self.fingerprint = self._fingerprint()
        self.device = torch.device("cpu")
        self.to(device if device is not None else default_device())

    def _fingerprint(self) -> str:
        digest = weights_digest(self.backbone)
        handling = {"backbone": type(self.backbone).__name__, "preprocessing": self.preprocessing.to_dict(),
                    "input_size": self.input_size, "patch_size": self.patch_size}
        digest.update(json.dumps(handling, sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def to(self, device) -> Encoder:
        """Move the backbone to ``device`` (str or torch.device); returns self."""
        self.device = torch.device(device)
        self.backbone.to(self.device)
        return self

    def trainable_parameters(self) -> int:
        """Number of encoder parameters (0 for the pixel baseline)."""
        return sum(p.numel() for p in self.backbone.parameters())

    def random_like(self, seed: int = 0) -> Encoder:
        """Same architecture, preprocessing and input handling, randomly initialised weights (seeded)."""
        return Encoder(f"random_like({self.name}, seed={seed})", self.rebuild(seed), self.preprocessing,
                       self.input_size, self.patch_size, self.rebuild, self.device)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def embed_slices(self, x, patch_tokens: bool = False) -> dict[str, torch.Tensor]:
        """``x`` ``[B, 1, size, size]`` in [0, 1] (tensor or array) → ``{"cls": [B, D], "mean_patch": [B, D],
        "hemispheres": [B, 2, P]}`` (+ ``"patch": [B, N, P]`` with ``patch_tokens``), float32 on the CPU.
        ``hemispheres``: mean patch feature of the grid rows towards patient Left, then Right (see
        :func:`~braindino.encoder.backbones.hemisphere_means`; ``P = D`` for a ViT)."""
        x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
        size = self.preprocessing.size
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != (size, size):
            raise ValueError(f"slices must be [B, 1, {size}, {size}] (preprocessing.size), got {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True).float()
        if size != self.input_size:
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        with self._autocast():
            out = self.backbone(x)
        keys = ("cls", "mean_patch", "hemispheres", "patch")[:4 if patch_tokens else 3]
        return {key: out[key].float().cpu() for key in keys}

    def embed_volume(self, source, volume_index=None, patch_tokens: bool = False,
                     batch_size: int = DEFAULT_BATCH) -> VolumeEmbedding:
        """Ingest ``source`` (path | nibabel image | ``(array [X, Y, Z], affine [4, 4])``) exactly as
        ``braindino prepare`` does and embed its kept slices; raises InputError for a bad image."""
        volume, prepared = ingest_source(source, volume_index, self.preprocessing)
        return self.embed_prepared(prepared.slices, prepared.z_indices,
                                   volume_geometry(volume, prepared, self.input_size, self.grid),
                                   patch_tokens, batch_size)

    def embed_prepared(self, slices: np.ndarray, z: np.ndarray, geometry: dict, patch_tokens: bool = False,
                       batch_size: int = DEFAULT_BATCH) -> VolumeEmbedding:
        """Embed preprocessed ``slices`` ``[S, size, size]`` (z ``[S]``) in batches of ``batch_size``."""
        parts = [self.embed_slices(torch.from_numpy(slices[i:i + batch_size]).unsqueeze(1), patch_tokens)
                 for i in range(0, len(slices), batch_size)]
        joined = {key: torch.cat([part[key] for part in parts]).numpy() for key in parts[0]}
        return VolumeEmbedding(cls=joined["cls"], mean_patch=joined["mean_patch"], z=np.asarray(z, np.int32),
                               hemispheres=joined["hemispheres"], patch=joined.get("patch"),
                               volume=joined["cls"].mean(axis=0), slices=slices, geometry=geometry)

    def model_info(self) -> dict:
        """The ``model.json`` of a features folder made with this encoder."""
        return {"name": self.name, "fingerprint": self.fingerprint, "preprocessing": self.preprocessing.to_dict(),
                "input_size": self.input_size, "embed_dim": self.embed_dim, "patch_size": self.patch_size,
                "grid": list(self.grid)}

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, fingerprint={self.fingerprint}, D={self.embed_dim}, "
                f"input {self.input_size}px, patch {self.patch_size}, device {self.device})")

