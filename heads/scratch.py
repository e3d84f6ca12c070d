"""The supervised-from-scratch slice network: the baseline a pretrained encoder has to beat (BrainIAC's comparison;
Neuro-JEPA found foundation models often fail to beat it).

:class:`SliceCNN` is a narrow 2D SFCN (Peng et al., Medical Image Analysis 2021: blocks of 3×3 convolution, batch norm,
ReLU and 2×2 max pooling, then global average pooling), applied to each preprocessed axial slice:
``x`` ``[B, 1, H, W]`` → ``[B, C_last]``. With the default channels (8, 16, 32, 64) it has 24,504 parameters; the
trainer (:class:`heads.slice_network.SliceNetworkHead`) pools its slice embeddings per volume and adds the output
layer. :class:`ScratchCNN` is the picklable recipe that builds a freshly initialised one per training set.
"""

from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_CHANNELS = (8, 16, 32, 64)
BN_MOMENTUM = 0.3   # short runs (tens of steps): running statistics must catch up with the weights quickly


class SliceCNN(nn.Module):
    """``x`` ``[B, 1, H, W]`` (slices in [0, 1]) → ``[B, channels[-1]]``.

    Each block: Conv2d 3×3 (padding 1, no bias) → BatchNorm2d (momentum ``BN_MOMENTUM``) → ReLU → MaxPool2d 2, so
    ``H`` and ``W`` must be at least ``2 ** len(channels)``; then global average pooling. ``frozen`` is the
    identity (every parameter trains).
    """

    def __init__(self, channels=DEFAULT_CHANNELS):
        super().__init__()
        layers, width = [], 1
        for out in channels:
            layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out, momentum=BN_MOMENTUM),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            width = out
        self.features = nn.Sequential(*layers)
        self.out_features = width
        self.min_size = 2 ** len(channels)

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The part computed once, without gradients, before training: nothing here."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < self.min_size or x.shape[-2] < self.min_size:
            raise ValueError(f"slices must be at least {self.min_size} px for {len(self.features) // 4} blocks, got "
                             f"{tuple(x.shape[-2:])}")
        return self.features(x).mean(dim=(2, 3))


@dataclass(frozen=True)
class ScratchCNN:
    """Recipe of a randomly initialised :class:`SliceCNN` (call it under a seeded RNG): ``channels`` per block and
    the slice size ``size`` (px) its inputs are resized to."""

    channels: tuple = DEFAULT_CHANNELS
    size: int = 64

    def __call__(self) -> SliceCNN:
        return SliceCNN(self.channels)

    def parameters(self) -> int:
        """Parameters of the CNN (without the trainer's output layer)."""
        return sum(p.numel() for p in SliceCNN(self.channels).parameters())

    def describe(self) -> str:
        return (f"SFCN-like 2D CNN (channels {'-'.join(map(str, self.channels))}, {self.parameters():,} parameters "
                f"+ output layer) on {self.size} px slices")
