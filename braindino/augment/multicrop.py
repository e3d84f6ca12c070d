"""The DINO multi-crop view generator: global and local crops of every slice, each intensity-augmented.

Every crop gets its own geometry (``braindino.augment.geometry``) and its own intensity augmentation
(``braindino.augment.intensity``): the scanner's effects (gamma, bias field, Gibbs ringing, ghosting, spike) on its
copy of the whole slice before cropping, blur/noise/contrast on the crop; all crops of one type are produced by one batched resampling on the images'
device. Outputs are crop-major: rows ``[c * B:(c + 1) * B]`` hold crop ``c`` of images ``0..B-1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from braindino.augment.geometry import apply_crops, sample_crop_parameters
from braindino.augment.intensity import IntensityAugmentConfig, augment_acquisition, augment_appearance
from braindino.augment.sampling import check_generator, check_image_batch


@dataclass
class MultiCropConfig:
    """Sizes, counts and ranges of the multi-crop views.

    global_scale / local_scale: crop area as a fraction of the slice area; ratio: crop width/height range
    (log-uniform); flip_p: left-right flip probability; max_rotation_deg: rotation ~ U(-max, max) degrees.
    """

    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple = (0.32, 1.0)
    local_scale: tuple = (0.05, 0.32)
    ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    max_rotation_deg: float = 10.0
    intensity: IntensityAugmentConfig = field(default_factory=IntensityAugmentConfig)


class MultiCropAugmentation:
    """Turns a batch of slices into DINO's global and local views.

    ``__call__(images, generator)``: images ``[B, C, H, W]`` float (slices from the store, values about
    ``[0, 1]``, any float dtype; computed and returned in float32) ->
    ``{"global": [n_global * B, C, G, G], "local": [n_local * B, C, L, L]}`` (``[0, C, L, L]`` when
    ``n_local == 0``), crop-major, on ``images.device``. ``generator`` must be a ``torch.Generator`` on the same
    device as ``images`` (``torch.Generator(device="cuda")`` for CUDA batches); the same generator state and
    images give identical output.
    """

    def __init__(self, config: MultiCropConfig):
        if config.n_global < 1 or config.n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {config.n_global} and {config.n_local}")
        if config.global_size < 1 or config.local_size < 1:
            raise ValueError(f"crop sizes must be positive, got {config.global_size} and {config.local_size}")
        self.config = config

    def _crops(
        self, images: torch.Tensor, n_crops: int, size: int, scale: tuple, generator: torch.Generator
    ) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[n_crops * B, C, size, size]`` crop-major: slice-level acquisition effects,
        then geometry, then per-crop appearance."""
        config = self.config
        parameters = sample_crop_parameters(
            n_crops * images.shape[0],
            tuple(images.shape[-2:]),
            scale,
            config.ratio,
            config.flip_p,
            config.max_rotation_deg,
            generator,
            images.device,
        )
        acquired = augment_acquisition(images.repeat(n_crops, 1, 1, 1), config.intensity, generator)
        return augment_appearance(apply_crops(acquired, parameters, size), config.intensity, generator)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        check_image_batch(images)
        check_generator(generator, images.device)
        config = self.config
        images = images.float()
        global_crops = self._crops(images, config.n_global, config.global_size, config.global_scale, generator)
        if config.n_local == 0:
            local_crops = images.new_empty((0, images.shape[1], config.local_size, config.local_size))
        else:
            local_crops = self._crops(images, config.n_local, config.local_size, config.local_scale, generator)
        return {"global": global_crops, "local": local_crops}
