"""Multi-crop geometry and MRI intensity augmentations: exact references where they exist, invariants otherwise."""

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from braindino.augment import (
    OUTPUT_RANGE,
    CropParameters,
    IntensityAugmentConfig,
    MultiCropAugmentation,
    MultiCropConfig,
    add_ghosting,
    add_spike,
    apply_crops,
    augment_intensity,
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
    sample_crop_parameters,
)

NO_INTENSITY = IntensityAugmentConfig(
    p_gamma=0, p_contrast=0, p_bias_field=0, p_gibbs=0, p_spike=0, p_ghosting=0, p_noise=0, p_blur=0
)


def generator(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def phantom(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """``[B, 1, size, size]`` brain-like slices: a bright textured ellipse on a black background."""
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    inside = ((rows / 0.8) ** 2 + (cols / 0.65) ** 2 <= 1).float()
    texture = torch.rand((batch, 1, size, size), generator=generator(seed))
    return inside * (0.4 + 0.5 * texture)


def small_config(**changes) -> MultiCropConfig:
    settings = dict(global_size=32, local_size=16, n_global=2, n_local=3, intensity=NO_INTENSITY)
    settings.update(changes)
    return MultiCropConfig(**settings)


def test_multicrop_shapes_and_crop_major_order():
    levels = torch.tensor([0.2, 0.5, 0.8])
    images = levels.view(3, 1, 1, 1).expand(3, 1, 48, 40).contiguous()
    views = MultiCropAugmentation(small_config())(images, generator(0))
    assert views["global"].shape == (6, 1, 32, 32)
    assert views["local"].shape == (9, 1, 16, 16)
    # Each crop of a constant image holds that image's value at its (in-bounds) centre.
    for name, n_crops in (("global", 2), ("local", 3)):
        per_row_max = views[name].amax(dim=(1, 2, 3)).view(n_crops, 3)
        torch.testing.assert_close(per_row_max, levels.expand(n_crops, 3), atol=1e-5, rtol=0)
    no_local = MultiCropAugmentation(small_config(n_local=0))(images, generator(0))
    assert no_local["local"].shape == (0, 1, 16, 16)


def test_multicrop_is_deterministic_per_seed_and_differs_across_seeds():
    augment = MultiCropAugmentation(small_config(intensity=IntensityAugmentConfig()))
    images = phantom(4, 48)
    first, again, other = (augment(images, generator(seed)) for seed in (7, 7, 8))
    for name in ("global", "local"):
        assert torch.equal(first[name], again[name])
        assert not torch.allclose(first[name], other[name])
    assert first["global"].dtype == torch.float32


def test_full_scale_crop_equals_bilinear_resize():
    config = small_config(global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0,
                          max_rotation_deg=0.0)
    images = phantom(3, 64)
    views = MultiCropAugmentation(config)(images, generator(1))
    for name, size, n_crops in (("global", 32, 2), ("local", 16, 3)):
        expected = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        torch.testing.assert_close(views[name], expected.repeat(n_crops, 1, 1, 1), atol=1e-5, rtol=0)


def test_flip_only_is_torch_flip():
    config = small_config(global_size=40, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0,
                          max_rotation_deg=0.0, n_local=0)
    images = phantom(2, 40)
    views = MultiCropAugmentation(config)(images, generator(2))
    # rows run along the R axis in the store layout, so a left-right flip reverses the rows
    torch.testing.assert_close(views["global"], torch.flip(images, dims=(-2,)).repeat(2, 1, 1, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("angle, quarter_turns", [(90.0, 1), (-90.0, -1), (180.0, 2)])
def test_quarter_rotation_of_full_square_crop_is_rot90(angle, quarter_turns):
    images = phantom(1, 24)
    parameters = CropParameters(
        centers=torch.tensor([[12.0, 12.0]]), sizes=torch.tensor([[24.0, 24.0]]),
        flips=torch.tensor([False]), angles_deg=torch.tensor([angle]),
    )
    rotated = apply_crops(images, parameters, 24)
    torch.testing.assert_close(rotated, torch.rot90(images, quarter_turns, dims=(-2, -1)), atol=1e-4, rtol=0)


def test_crop_boxes_follow_ranges_and_stay_inside():
    height, width = 48, 64
    parameters = sample_crop_parameters(4000, (height, width), (0.05, 0.32), (0.75, 4 / 3), 0.5, 10.0,
                                        generator(3), torch.device("cpu"))
    box_width, box_height = parameters.sizes.unbind(1)
    area_fraction = box_width * box_height / (height * width)
    aspect = box_width / box_height
    assert area_fraction.min() >= 0.05 - 1e-6 and area_fraction.max() <= 0.32 + 1e-6
    assert abs(area_fraction.mean().item() - (0.05 + 0.32) / 2) < 0.01
    assert aspect.min() >= 0.75 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5
    # log-uniform aspect: log-ratio mean at the middle of the log range
    assert abs(aspect.log().mean().item() - (math.log(0.75) + math.log(4 / 3)) / 2) < 0.01
    left = parameters.centers[:, 0] - box_width / 2
    top = parameters.centers[:, 1] - box_height / 2
    assert left.min() >= -1e-4 and (left + box_width).max() <= width + 1e-4
    assert top.min() >= -1e-4 and (top + box_height).max() <= height + 1e-4
    assert abs(parameters.flips.float().mean().item() - 0.5) < 0.03
    assert parameters.angles_deg.abs().max() <= 10.0 and parameters.angles_deg.std() > 5.0


def test_crop_that_cannot_fit_falls_back_to_largest_box_with_clamped_aspect():
    parameters = sample_crop_parameters(5, (48, 64), (1.0, 1.0), (1.0, 1.0), 0.0, 0.0, generator(0),
                                        torch.device("cpu"))
    torch.testing.assert_close(parameters.sizes, torch.tensor([[48.0, 48.0]]).expand(5, 2))
    assert torch.all(parameters.centers[:, 1] == 24.0)


def test_generator_on_another_device_is_rejected():
    images = torch.zeros((2, 1, 8, 8), device="meta")
    with pytest.raises(ValueError, match="torch.Generator\\(device='meta'\\)"):
        MultiCropAugmentation(small_config())(images, generator(0))


RANDOM_OPS = [random_gamma, random_contrast, random_bias_field, random_gibbs, random_spike, random_ghosting,
              random_noise, random_blur]


@pytest.mark.parametrize("operation", RANDOM_OPS, ids=lambda op: op.__name__)
def test_probability_zero_is_identity_and_probability_one_changes_every_sample(operation):
    images = phantom(4, 32)
    assert operation(images, generator(0), 0.0) is images
    changed = operation(images, generator(0), 1.0)
    assert changed.shape == images.shape
    assert torch.all((changed - images).abs().amax(dim=(1, 2, 3)) > 1e-4)


def test_probability_selects_about_that_fraction_of_samples():
    images = phantom(400, 8)
    changed = random_contrast(images, generator(4), 0.3)
    fraction = ((changed - images).abs().amax(dim=(1, 2, 3)) > 0).float().mean().item()
    assert abs(fraction - 0.3) < 0.07


def test_gamma_fixes_zero_and_one_and_is_a_monotone_power():
    ramp = torch.linspace(0, 1, 33).view(1, 1, 1, 33).expand(6, 1, 2, 33)
    out = random_gamma(ramp, generator(5), 1.0, (-0.3, 0.3))
    assert torch.all(out[..., 0] == 0) and torch.allclose(out[..., -1], torch.ones(6, 1, 2))
    assert torch.all(out[..., 1:] >= out[..., :-1])
    exponents = out[..., 1:-1].log() / ramp[..., 1:-1].log()
    per_sample = exponents.flatten(1)
    torch.testing.assert_close(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-4, rtol=0)
    assert per_sample.min() >= math.exp(-0.3) - 1e-5 and per_sample.max() <= math.exp(0.3) + 1e-5
    assert per_sample[:, 0].std() > 0.02
    negative = random_gamma(torch.full((2, 1, 4, 4), -0.2), generator(5), 1.0, (-0.3, 0.3))
    assert torch.equal(negative, torch.zeros_like(negative))   # gamma acts on the clamped non-negative part


def test_contrast_is_an_affine_map_within_ranges():
    images = phantom(5, 16)
    out = random_contrast(images, generator(6), 1.0, (0.75, 1.25), (-0.1, 0.1))
    for before, after in zip(images.flatten(1).numpy(), out.flatten(1).numpy()):
        design = np.stack([before, np.ones_like(before)], axis=1)
        (scale, shift), *_ = np.linalg.lstsq(design, after, rcond=None)
        np.testing.assert_allclose(design @ [scale, shift], after, atol=1e-5)
        assert 0.75 <= scale <= 1.25 and -0.1 <= shift <= 0.1


def test_bias_field_is_exp_of_a_bounded_polynomial_of_the_given_order():
    height, width, order, coefficient = 20, 24, 3, 0.5
    images = torch.full((4, 1, height, width), 0.5)
    field = random_bias_field(images, generator(7), 1.0, coefficient, order) / images
    assert field.min() > 0
    y, x = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    vander = np.polynomial.polynomial.polyvander2d(x.ravel(), y.ravel(), [order, order])
    keep = [i * (order + 1) + j for i in range(order + 1) for j in range(order + 1) if i + j <= order]
    for log_field in field.log().flatten(1).double().numpy():
        fitted, *_ = np.linalg.lstsq(vander[:, keep], log_field, rcond=None)
        np.testing.assert_allclose(vander[:, keep] @ fitted, log_field, atol=1e-5)
        assert np.all(np.abs(fitted) <= coefficient + 1e-4) and np.abs(fitted).max() > 0.05


def test_gibbs_keeping_everything_is_identity_and_truncation_rings_like_numpy():
    images = phantom(2, 32)
    torch.testing.assert_close(gibbs_ringing(images, torch.ones(2)), images, atol=1e-5, rtol=0)
    torch.testing.assert_close(random_gibbs(images, generator(0), 1.0, (1.0, 1.0)), images, atol=1e-5, rtol=0)
    step = torch.zeros(1, 1, 32, 32)
    step[..., 8:24] = 1.0
    rung = gibbs_ringing(step, torch.tensor([0.5]))
    frequencies = np.abs(np.fft.fftfreq(32))
    keep = (frequencies[:, None] <= 0.25) & (frequencies[None, :] <= 0.25)
    expected = np.real(np.fft.ifft2(np.fft.fft2(step[0, 0].numpy()) * keep))
    np.testing.assert_allclose(rung[0, 0].numpy(), expected, atol=1e-5)
    profile = rung[0, 0, 16]
    assert profile.max() > 1.05 and profile[:8].min() < -0.03   # overshoot inside, undershoot outside the edge


def test_spike_adds_one_conjugate_pair_of_the_requested_amplitude():
    images = phantom(4, 32)
    spectrum_max = torch.fft.fft2(images).abs().amax(dim=(1, 2, 3))
    # generic bin, its conjugate, and the two self-conjugate Nyquist bins (16, 0) and (16, 16)
    locations = torch.tensor([3 * 32 + 5, 29 * 32 + 27, 16 * 32, 16 * 32 + 16])
    out = add_spike(images, locations, torch.full((4,), 0.3))
    change = torch.fft.fft2(out - images)[:, 0]
    for sample, location in enumerate(locations.tolist()):
        row, col = divmod(location, 32)
        expected = torch.zeros(32, 32, dtype=torch.complex64)
        expected[row, col] = expected[(-row) % 32, (-col) % 32] = 0.3 * spectrum_max[sample]
        torch.testing.assert_close(change[sample], expected, atol=1e-3 * spectrum_max[sample].item(), rtol=0)
    spiked = random_spike(images, generator(8), 1.0, (0.3, 0.3))
    random_change = torch.fft.fft2(spiked - images)[:, 0].abs()
    for sample in range(4):
        bins = torch.nonzero(random_change[sample] > 1e-3 * spectrum_max[sample])
        assert 1 <= len(bins) <= 2 and not torch.any(torch.all(bins == 0, dim=1))  # one pair, never DC
        row, col = bins[0].tolist()
        assert random_change[sample, (-row) % 32, (-col) % 32] > 0.29 * spectrum_max[sample]


def test_ghosting_attenuates_every_nth_line_like_numpy():
    images = phantom(2, 30)
    out = add_ghosting(images, torch.tensor([3, 4]), torch.tensor([0.4, 0.25]), torch.tensor([0, 1]))
    for sample, (count, strength, axis) in enumerate([(3, 0.4, 0), (4, 0.25, 1)]):
        signed = np.rint(np.fft.fftfreq(30, d=1 / 30)).astype(int)
        lines = (signed % count == 0) & (signed != 0)
        factor = np.where(lines, 1 - strength, 1.0)
        factor = factor[:, None] if axis == 0 else factor[None, :]
        expected = np.real(np.fft.ifft2(np.fft.fft2(images[sample, 0].double().numpy()) * factor))
        np.testing.assert_allclose(out[sample, 0].numpy(), expected, atol=1e-5)
    shifted = random_ghosting(images, generator(9), 1.0, (2, 6), (0.1, 0.5))
    torch.testing.assert_close(shifted.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    change = torch.fft.fft2(shifted - images).abs()
    lost = (change ** 2).sum(dim=(2, 3)) / (torch.fft.fft2(images).abs() ** 2).sum(dim=(2, 3))
    assert torch.all(lost > 1e-4) and torch.all(lost < 0.25)


def test_noise_has_the_requested_standard_deviation():
    images = torch.full((4, 1, 96, 96), 0.5)
    noise = random_noise(images, generator(10), 1.0, (0.05, 0.05)) - images
    assert abs(noise.mean().item()) < 2e-3
    assert abs(noise.std().item() - 0.05) < 1.5e-3


def test_blur_matches_scipy_and_removes_high_frequencies():
    images = torch.rand((3, 1, 20, 20), generator=generator(11))
    sigmas = torch.tensor([0.7, 1.0, 1.5])
    blurred = gaussian_blur(images, sigmas)
    for sample, sigma in enumerate(sigmas.tolist()):
        expected = scipy.ndimage.gaussian_filter(images[sample, 0].double().numpy(), sigma, mode="nearest", radius=5)
        np.testing.assert_allclose(blurred[sample, 0].numpy(), expected, atol=1e-5)
    out = random_blur(images, generator(12), 1.0, (0.5, 1.5))
    high = torch.fft.fftfreq(20).abs() > 0.25
    high_band = high.view(-1, 1) | high.view(1, -1)

    def high_energy(x):
        return (torch.fft.fft2(x).abs() ** 2)[..., high_band].sum(dim=-1)

    assert torch.all(high_energy(out) < 0.5 * high_energy(images))


def test_augment_intensity_clamps_and_is_deterministic():
    config = IntensityAugmentConfig(p_gamma=1, p_contrast=1, p_bias_field=1, p_gibbs=1, p_spike=1, p_ghosting=1,
                                    p_noise=1, p_blur=1, scale=(1.5, 2.0))
    images = phantom(6, 32)
    out = augment_intensity(images, config, generator(13))
    assert out.min() >= OUTPUT_RANGE[0] and out.max() <= OUTPUT_RANGE[1] and out.max() == OUTPUT_RANGE[1]
    assert torch.equal(out, augment_intensity(images, config, generator(13)))
    assert torch.equal(augment_intensity(images, NO_INTENSITY, generator(0)), images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pipeline_matches_cpu_statistics_and_geometry():
    images = phantom(64, 64)
    augment = MultiCropAugmentation(small_config(global_size=48, local_size=24, n_local=4,
                                                 intensity=IntensityAugmentConfig()))
    on_cpu = augment(images, generator(14))
    on_cuda = augment(images.cuda(), generator(14, "cuda"))
    for name in ("global", "local"):
        assert on_cuda[name].device.type == "cuda" and on_cuda[name].shape == on_cpu[name].shape
        repeated = augment(images.cuda(), generator(14, "cuda"))[name]
        torch.testing.assert_close(on_cuda[name], repeated, atol=1e-6, rtol=0)
        cpu_values, cuda_values = on_cpu[name], on_cuda[name].cpu()
        assert abs(cpu_values.mean() - cuda_values.mean()) < 0.05
        assert abs(cpu_values.std() - cuda_values.std()) < 0.05
    parameters = sample_crop_parameters(64, (64, 64), (0.2, 1.0), (0.75, 4 / 3), 0.5, 10.0, generator(15),
                                        torch.device("cpu"))
    cuda_parameters = CropParameters(*(torch.as_tensor(t).cuda() for t in (parameters.centers, parameters.sizes,
                                                                             parameters.flips, parameters.angles_deg)))
    # same parameters, same result; the tolerance allows TF32 matmuls/convolutions if a caller enabled them
    torch.testing.assert_close(apply_crops(images.cuda(), cuda_parameters, 32).cpu(),
                               apply_crops(images, parameters, 32), atol=3e-3, rtol=0)
    sigmas = torch.linspace(0.2, 1.5, 64)
    torch.testing.assert_close(gaussian_blur(images.cuda(), sigmas.cuda()).cpu(), gaussian_blur(images, sigmas),
                               atol=3e-3, rtol=0)


def test_flip_mirrors_left_right_anatomy_not_front_back():
    """Through the real ingest layout: a marker on the right moves to the left, one at the front stays in front."""
    import numpy as np

    from braindino.ingest import PreprocessConfig, Volume, preprocess_volume

    data = np.zeros((40, 40, 3), dtype=np.float32)
    data[4:36, 4:36, :] = 1.0                 # head
    data[32:35, 18:22, :] = 5.0               # marker on the right (high X in RAS)
    data[18:22, 32:35, :] = 3.0               # marker at the front (high Y in RAS)
    volume = Volume(data=data, affine=np.eye(4), spacing=(1.0, 1.0, 1.0), source_path="phantom")
    slices = preprocess_volume(volume, PreprocessConfig(size=40, foreground="nonzero")).slices
    image = torch.from_numpy(slices[1:2].astype(np.float32)).unsqueeze(1)
    config = small_config(global_size=40, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0,
                          max_rotation_deg=0.0, n_local=0)
    flipped = MultiCropAugmentation(config)(image, generator(0))["global"][0, 0]

    def centre_of(values, mask_value):
        rows, cols = torch.nonzero(values == mask_value, as_tuple=True)
        return rows.float().mean(), cols.float().mean()

    right_row, right_col = centre_of(image[0, 0], image[0, 0].max())
    flipped_row, flipped_col = centre_of(flipped, flipped.max())
    assert right_row > 25 and flipped_row < 15                       # right -> left
    assert abs(flipped_col - right_col) < 1                          # front-back position unchanged


def test_intensity_chain_copies_once_never_touches_its_input_and_equals_the_steps_one_by_one():
    from braindino.augment.intensity import (OUTPUT_RANGE, IntensityAugmentConfig, augment_intensity,
                                             random_bias_field, random_blur, random_contrast, random_gamma, random_ghosting,
                                             random_gibbs, random_noise, random_spike)
    config = IntensityAugmentConfig(p_gamma=0.5, p_bias_field=0.5, p_gibbs=0.5, p_ghosting=0.5, p_spike=0.5,
                                    p_blur=0.5, p_noise=0.5, p_contrast=0.5)
    images = torch.rand(12, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    before = images.clone()
    chained = augment_intensity(images, config, torch.Generator().manual_seed(7))
    assert torch.equal(images, before)
    generator = torch.Generator().manual_seed(7)
    expected = images
    for step in (lambda x: random_gamma(x, generator, config.p_gamma, config.log_gamma),
                 lambda x: random_bias_field(x, generator, config.p_bias_field, config.bias_coefficient,
                                             config.bias_order),
                 lambda x: random_gibbs(x, generator, config.p_gibbs, config.gibbs_keep_fraction),
                 lambda x: random_ghosting(x, generator, config.p_ghosting, config.ghost_count,
                                           config.ghost_intensity),
                 lambda x: random_spike(x, generator, config.p_spike, config.spike_intensity),
                 lambda x: random_blur(x, generator, config.p_blur, config.blur_sigma),
                 lambda x: random_noise(x, generator, config.p_noise, config.noise_std),
                 lambda x: random_contrast(x, generator, config.p_contrast, config.scale, config.shift)):
        kept = expected.clone()
        result = step(expected)
        assert torch.equal(expected, kept)   # each step alone is out of place
        expected = result
    assert torch.equal(images, before) and torch.equal(chained, expected.clamp(*OUTPUT_RANGE)) and not torch.equal(chained, images)


@pytest.mark.parametrize("height, width", [(31, 33), (32, 33), (31, 32)])
def test_half_spectrum_filters_equal_the_full_spectrum_on_odd_and_even_grids(height, width):
    """Gibbs and ghosting filter the real FFT's half spectrum: the same image as numpy's full fft2 → gain → ifft2,
    whatever the parity of each axis (the Nyquist row / column is where a half-spectrum mask goes wrong)."""
    images = torch.rand((2, 1, height, width), generator=generator(4))
    rows, cols = np.abs(np.fft.fftfreq(height)), np.abs(np.fft.fftfreq(width))
    rung = gibbs_ringing(images, torch.tensor([0.5, 1.0]))
    for sample, keep_fraction in enumerate([0.5, 1.0]):
        keep = (rows[:, None] <= keep_fraction / 2) & (cols[None, :] <= keep_fraction / 2)
        expected = np.real(np.fft.ifft2(np.fft.fft2(images[sample, 0].double().numpy()) * keep))
        np.testing.assert_allclose(rung[sample, 0].numpy(), expected, atol=2e-6)
    ghosted = add_ghosting(images, torch.tensor([2, 3]), torch.tensor([0.5, 0.3]), torch.tensor([1, 0]))
    for sample, (count, strength, axis) in enumerate([(2, 0.5, 1), (3, 0.3, 0)]):
        signed = np.rint(np.fft.fftfreq(width if axis == 1 else height, d=1 / (width if axis == 1 else height)))
        factor = np.where((signed.astype(int) % count == 0) & (signed != 0), 1 - strength, 1.0)
        factor = factor[None, :] if axis == 1 else factor[:, None]
        expected = np.real(np.fft.ifft2(np.fft.fft2(images[sample, 0].double().numpy()) * factor))
        np.testing.assert_allclose(ghosted[sample, 0].numpy(), expected, atol=2e-6)


@pytest.mark.parametrize("size", [7, 16, 96])
def test_sampling_grid_is_affine_grid(size):
    """The crop's sampling grid equals ``F.affine_grid(align_corners=False)`` (pixel centres, x along W, y along H)
    to float rounding; the align_corners=True lattice or swapped axes differ by ≥ 1/size."""
    from braindino.augment.geometry import sampling_grid

    theta = torch.randn((5, 2, 3), generator=generator(size))
    expected = F.affine_grid(theta, [5, 1, size, size], align_corners=False)
    torch.testing.assert_close(sampling_grid(theta, size), expected, atol=2e-6, rtol=0)
