"""Fixes that bear on what the encoder learns: every head's last layer frozen, slice-level acquisition effects."""

import torch

from braindino.augment import IntensityAugmentConfig, MultiCropAugmentation, MultiCropConfig
from braindino.train.config import load_config
from braindino.train.distributed import DistInfo
from braindino.train.step import TrainingStep, build_training

TINY = ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.drop_path_rate=0.0",
        "crops.global_size=32", "crops.local_size=16", "crops.n_local=2", "dino.n_prototypes=32",
        "ibot.n_prototypes=48", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16", "optim.global_batch_size=4",
        "optim.warmup_iters=0", "optim.base_lr=0.05", "ibot.separate_head=true", "ibot.mask_sample_probability=1.0",
        "dino.freeze_last_layer_iters=1", "train.num_workers=0"]


def test_separate_ibot_head_keeps_its_last_layer_frozen_like_the_dino_head():
    config = load_config(None, TINY)
    training = build_training(config, DistInfo(0, 1, 0, torch.device("cpu")))
    student = training.student_module
    assert student.ibot_head is not student.dino_head
    step = TrainingStep(config, training, DistInfo(0, 1, 0, torch.device("cpu")))
    batch = torch.rand(4, 1, 40, 40)

    def snapshot(head):
        return {name: p.detach().clone() for name, p in head.named_parameters()}

    before = {"dino": snapshot(student.dino_head), "ibot": snapshot(student.ibot_head)}
    assert step(0, batch).applied                     # step 0 < freeze_last_layer_iters: prototypes stay fixed
    for head_name, head in (("dino", student.dino_head), ("ibot", student.ibot_head)):
        for name, value in head.named_parameters():
            if not value.requires_grad:               # the weight-norm magnitude is fixed for good
                continue
            changed = not torch.equal(before[head_name][name], value)
            assert changed != name.startswith("last_layer"), f"{head_name}_head.{name}: changed={changed}"
    frozen = snapshot(student.ibot_head)
    assert step(1, batch).applied                     # after the freeze the iBOT prototypes learn
    assert any(not torch.equal(frozen[n], p) for n, p in student.ibot_head.named_parameters()
               if n.startswith("last_layer") and p.requires_grad)


def test_bias_field_of_a_small_crop_is_the_part_of_the_slice_field_it_covers():
    """A 5 % crop of a slice sees a small share of the coil's field, not a whole head's worth of variation."""
    only_bias = IntensityAugmentConfig(p_gamma=0, p_contrast=0, p_bias_field=1.0, bias_coefficient=0.5, p_gibbs=0,
                                       p_spike=0, p_ghosting=0, p_noise=0, p_blur=0)
    flat = torch.full((64, 1, 96, 96), 0.5)   # a uniform slice: each output pixel is 0.5 * the field there

    def relative_range(scale):
        config = MultiCropConfig(global_size=32, local_size=32, n_global=1, n_local=0, global_scale=(scale, scale),
                                 flip_p=0.0, max_rotation_deg=0.0, intensity=only_bias)
        crops = MultiCropAugmentation(config)(flat, torch.Generator().manual_seed(0))["global"]
        flat_crops = crops.flatten(1)
        return ((flat_crops.amax(1) - flat_crops.amin(1)) / flat_crops.mean(1)).mean()

    whole, small = relative_range(1.0), relative_range(0.05)
    assert whole > 0.3                                # the field does vary over a slice
    assert small < 0.45 * whole, (float(small), float(whole))
