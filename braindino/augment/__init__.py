"""Batched augmentations for DINO pretraining: multi-crop views, MRI intensity augmentations, iBOT patch masks.

Everything random takes an explicit generator: a ``torch.Generator`` on the images' device for the torch ops, a
``numpy.random.Generator`` for the patch masks.
"""

from braindino.augment.geometry import (
    CropParameters,
    apply_crops,
    crop_affine_matrices,
    random_resized_crop,
    sample_crop_parameters,
)
from braindino.augment.intensity import (
    OUTPUT_RANGE,
    IntensityAugmentConfig,
    add_ghosting,
    add_spike,
    adjust_contrast,
    adjust_gamma,
    apply_bias_field,
    augment_intensity,
    bias_field_basis,
    gaussian_blur,
    gibbs_ringing,
    random_bias_field,
    random_blur,
    random_contrast,
    random_gamma,
    random_ghosting,
    random_gibbs,
    random_noise,
    random_spike,
)
from braindino.augment.masking import BlockMaskGenerator, IBOTMaskSampler, MaskBatch, sample_batch_masks
from braindino.augment.multicrop import MultiCropAugmentation, MultiCropConfig

__all__ = [
    "OUTPUT_RANGE",
    "BlockMaskGenerator",
    "IBOTMaskSampler",
    "CropParameters",
    "IntensityAugmentConfig",
    "MaskBatch",
    "MultiCropAugmentation",
    "MultiCropConfig",
    "add_ghosting",
    "add_spike",
    "adjust_contrast",
    "adjust_gamma",
    "apply_bias_field",
    "apply_crops",
    "augment_intensity",
    "bias_field_basis",
    "crop_affine_matrices",
    "gaussian_blur",
    "gibbs_ringing",
    "random_bias_field",
    "random_blur",
    "random_contrast",
    "random_gamma",
    "random_ghosting",
    "random_gibbs",
    "random_noise",
    "random_resized_crop",
    "random_spike",
    "sample_batch_masks",
    "sample_crop_parameters",
]
