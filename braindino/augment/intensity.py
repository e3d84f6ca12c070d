"""MRI intensity augmentations on batches of slices, batched on the images' device.

Every augmentation comes in two forms: a deterministic one taking per-sample parameters as ``[B]`` tensors
(``adjust_gamma``, ``apply_bias_field``, ``gibbs_ringing``, ``add_spike``, ``add_ghosting``, ``gaussian_blur``...)
and a ``random_*`` one that applies it to each sample with probability ``p`` and random parameters drawn from an
explicit ``torch.Generator`` living on the images' device. ``p <= 0`` returns the input unchanged and draws nothing.
Images are ``[B, C, H, W]`` floating-point tensors with values about ``[0, 1]`` and a black (0) background; the
parameters of one sample are shared by its channels. k-space operations use the unshifted ``torch.fft.fft2`` layout
and keep the real part of the inverse transform; they change the spectrum conjugate-symmetrically, so that real
part is the whole result.

``augment_acquisition`` (slice level, before cropping) and ``augment_appearance`` (per crop) split the chain;
``augment_intensity`` chains them in acquisition order — gamma (tissue contrast), bias field (coil sensitivity),
Gibbs ringing, ghosting, spike (k-space artefacts), blur, noise, then intensity scale/shift (windowing) — and clamps
the result to ``OUTPUT_RANGE``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from braindino.augment.sampling import apply_to_selected, check_generator, check_image_batch, draw_selection, uniform

OUTPUT_RANGE = (0.0, 1.5)
"""``augment_intensity`` clamps to this range: MRI magnitudes are non-negative, and the headroom above 1 keeps
brightening (scale > 1, bias field) from saturating the tissue."""


@dataclass
class IntensityAugmentConfig:
    """Probability ``p_*`` and parameter range of each op of ``augment_intensity``."""

    p_gamma: float = 0.5
    log_gamma: tuple = (-0.3, 0.3)
    p_contrast: float = 0.5
    scale: tuple = (0.75, 1.25)
    shift: tuple = (-0.1, 0.1)
    p_bias_field: float = 0.3
    bias_coefficient: float = 0.5
    bias_order: int = 3
    p_gibbs: float = 0.2
    gibbs_keep_fraction: tuple = (0.4, 0.9)
    p_spike: float = 0.1
    spike_intensity: tuple = (0.1, 0.5)
    p_ghosting: float = 0.1
    ghost_count: tuple = (2, 6)
    ghost_intensity: tuple = (0.1, 0.5)
    p_noise: float = 0.3
    noise_std: tuple = (0.0, 0.05)
    p_blur: float = 0.3
    blur_sigma: tuple = (0.1, 1.5)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, 1, 1]`` for broadcasting against ``[B, C, H, W]``."""
    return values.view(-1, 1, 1, 1)


def adjust_gamma(images: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``max(x, 0) ** gamma[b]``; keeps 0 and 1 fixed and is monotone. images ``[B, C, H, W]``, gamma ``[B]``."""
    return images.clamp(min=0).pow(_per_sample(gamma))


def adjust_contrast(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale[b] + shift[b]``. images ``[B, C, H, W]``, scale and shift ``[B]``."""
    return images * _per_sample(scale) + _per_sample(shift)


def bias_field_basis(order: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """``[K, H, W]`` monomials ``x^i * y^j`` (``i + j <= order``, ``K = (order+1)(order+2)/2``) on ``[-1, 1]^2``."""
    y = torch.linspace(-1.0, 1.0, height, device=device).view(height, 1)
    x = torch.linspace(-1.0, 1.0, width, device=device).view(1, width)
    monomials = [x.pow(i) * y.pow(j) for i in range(order + 1) for j in range(order + 1 - i)]
    return torch.stack(monomials, dim=0)


def apply_bias_field(images: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Multiply by the smooth positive field ``exp(sum_k c[b, k] * basis_k)``.

    images ``[B, C, H, W]``; coefficients ``[B, K]`` for the monomials of ``bias_field_basis`` of the order whose
    ``K`` matches.
    """
    n_terms = coefficients.shape[1]
    order = int(round((math.sqrt(8 * n_terms + 1) - 3) / 2))
    if (order + 1) * (order + 2) // 2 != n_terms:
        raise ValueError(f"{n_terms} bias-field coefficients match no polynomial order")
    basis = bias_field_basis(order, images.shape[-2], images.shape[-1], images.device).to(images.dtype)
    log_field = torch.einsum("bk,khw->bhw", coefficients.to(images.dtype), basis)
    return images * torch.exp(log_field).unsqueeze(1)


def gibbs_ringing(images: torch.Tensor, keep_fraction: torch.Tensor) -> torch.Tensor:
    """Zero k-space outside the centred box keeping ``keep_fraction[b]`` of each axis; 1 keeps everything.

    images ``[B, C, H, W]``, keep_fraction ``[B]`` in ``(0, 1]``. A frequency ``f`` (cycles/pixel, ``|f| <= 0.5``)
    is kept when ``|f| <= keep_fraction / 2``.
    """
    height, width = images.shape[-2:]
    half_keep = _per_sample(keep_fraction) / 2
    keep_rows = torch.fft.fftfreq(height, device=images.device).abs().view(1, 1, height, 1) <= half_keep
    keep_cols = torch.fft.rfftfreq(width, device=images.device).view(1, 1, 1, -1) <= half_keep
    return _real_filtered(images, keep_rows & keep_cols)


def add_spike(images: torch.Tensor, frequency_index: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
    """Add ``A = intensity[b] * max|F|`` at one k-space location and at its conjugate: stripes across the image.

    images ``[B, C, H, W]``; frequency_index ``[B]`` long, flat index ``ky * W + kx`` into the unshifted ``[H, W]``
    spectrum (0 is DC); intensity ``[B]``. ``max|F|`` is taken per sample and channel. The spectrum of the change is
    ``A`` at ``(ky, kx)`` and at ``(-ky, -kx)`` (once when both are the same bin), i.e. the image gains
    ``(2A / HW) * cos(2 pi (ky y / H + kx x / W))`` (``A / HW`` for a self-conjugate bin), computed directly.
    """
    height, width = images.shape[-2:]
    # the half spectrum holds every |F| (|F(-k)| = |F(k)| for a real image): its max is the full max
    amplitude = torch.fft.rfft2(images).abs().amax(dim=(-2, -1)) * intensity.view(-1, 1)
    row_frequency = (frequency_index // width).to(images.dtype)
    col_frequency = (frequency_index % width).to(images.dtype)
    self_conjugate = ((2 * (frequency_index // width)) % height == 0) & ((2 * (frequency_index % width)) % width == 0)
    multiplicity = 2.0 - self_conjugate.to(images.dtype)
    rows = torch.arange(height, device=images.device, dtype=images.dtype).view(1, height, 1)
    cols = torch.arange(width, device=images.device, dtype=images.dtype).view(1, 1, width)
    phase = 2 * math.pi * (row_frequency.view(-1, 1, 1) * rows / height + col_frequency.view(-1, 1, 1) * cols / width)
    stripes = torch.cos(phase) * (multiplicity / (height * width)).view(-1, 1, 1)
    return images + amplitude[:, :, None, None] * stripes.unsqueeze(1)


def add_ghosting(
    images: torch.Tensor, ghost_count: torch.Tensor, intensity: torch.Tensor, axis: torch.Tensor
) -> torch.Tensor:
    """Attenuate every ``n``-th k-space line by ``1 - intensity``: ``n``-fold ghost copies along one axis.

    images ``[B, C, H, W]``; ghost_count ``[B]`` long ``n >= 1``; intensity ``[B]``; axis ``[B]`` long, 0 for
    lines indexed by the row frequency (ghosts displaced along rows/H), 1 for the column frequency (along W).
    Lines are picked by signed frequency index ``f`` with ``f % n == 0`` and ``f != 0`` (the DC line is kept,
    preserving the mean profile), which is symmetric under ``f -> -f``.
    """
    height, width = images.shape[-2:]
    count = ghost_count.view(-1, 1)
    row_index = torch.fft.fftfreq(height, d=1.0 / height, device=images.device).round().long().view(1, height)
    col_index = torch.fft.rfftfreq(width, d=1.0 / width, device=images.device).round().long().view(1, -1)
    row_lines = (row_index.remainder(count) == 0) & (row_index != 0)
    col_lines = (col_index.remainder(count) == 0) & (col_index != 0)
    along_rows = (axis == 0).view(-1, 1, 1)
    lines = torch.where(along_rows, row_lines.unsqueeze(2), col_lines.unsqueeze(1))
    factor = 1.0 - intensity.view(-1, 1, 1).to(images.dtype) * lines.to(images.dtype)
    return _real_filtered(images, factor.unsqueeze(1))


def _real_filtered(images: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``ifft2(fft2(images) * G).real`` for a real ``images`` ``[B, C, H, W]`` and a gain ``G`` symmetric under
    ``k -> -k``, given on the half spectrum of ``torch.fft.rfft2`` (``gain`` broadcastable to ``[B, C, H, W // 2 +
    1]``): the filtered spectrum stays Hermitian, so the real transforms give the same image at half the work."""
    height, width = images.shape[-2:]
    return torch.fft.irfft2(torch.fft.rfft2(images) * gain, s=(height, width)).to(images.dtype)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur with per-sample ``sigma[b]`` in pixels, as grouped convolutions.

    images ``[B, C, H, W]``, sigma ``[B]`` > 0. Kernel radius ``radius`` for the whole batch (default
    ``ceil(3 * max(sigma))``, which reads ``sigma`` back to the host; pass it to keep a GPU step asynchronous),
    each kernel normalised to sum 1; borders replicate the edge pixel (like ``scipy.ndimage`` ``mode="nearest"``).
    """
    batch, channels, height, width = images.shape
    if radius is None:
        radius = math.ceil(3.0 * float(sigma.max()))
    radius = max(1, int(radius))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1).to(images.dtype)) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    groups = batch * channels
    blurred = F.pad(images.reshape(1, groups, height, width), (0, 0, radius, radius), mode="replicate")
    blurred = F.conv2d(blurred, kernels.view(groups, 1, -1, 1), groups=groups)
    blurred = F.pad(blurred, (radius, radius, 0, 0), mode="replicate")
    blurred = F.conv2d(blurred, kernels.view(groups, 1, 1, -1), groups=groups)
    return blurred.view(batch, channels, height, width)


def random_gamma(
    images: torch.Tensor, generator: torch.Generator, p: float = 0.5, log_gamma: tuple = (-0.3, 0.3),
    in_place: bool = False,
) -> torch.Tensor:
    """``adjust_gamma`` with ``gamma = exp(U(log_gamma))``, each sample with probability ``p``."""
    if p <= 0:
        return images
    batch, device = images.shape[0], images.device
    selected = draw_selection(batch, p, generator, device)
    gamma = torch.exp(uniform((batch,), *log_gamma, generator, device))
    return apply_to_selected(images, selected, adjust_gamma, gamma, in_place=in_place)


def random_contrast(
    images: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.5,
    scale: tuple = (0.75, 1.25),
    shift: tuple = (-0.1, 0.1),
    in_place: bool = False,
) -> torch.Tensor:
    """``adjust_contrast`` with ``scale ~ U(scale)``, ``shift ~ U(shift)``, each sample with probability ``p``."""
    if p <= 0:
        return images
    batch, device = images.shape[0], images.device
    selected = draw_selection(batch, p, generator, device)
    scales = uniform((batch,), *scale, generator, device)
    shifts = uniform((batch,), *shift, generator, device)
    return apply_to_selected(images, selected, adjust_contrast, scales, shifts, in_place=in_place)


def random_bias_field(
    images: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.3,
    coefficient: float = 0.5,
    order: int = 3,
    in_place: bool = False,
) -> torch.Tensor:
    """``apply_bias_field`` with every polynomial coefficient ``~ U(-coefficient, coefficient)`` (TorchIO-like)."""
    if p <= 0:
        return images
    batch, device = images.shape[0], images.device
    selected = draw_selection(batch, p, generator, device)
    n_terms = (order + 1) * (order + 2) // 2
    coefficients = uniform((batch, n_terms), -coefficient, coefficient, generator, device)
    return apply_to_selected(images, selected, apply_bias_field, coefficients, in_place=in_place)


def random_gibbs(
    images: torch.Tensor, generator: torch.Generator, p: float = 0.2, keep_fraction: tuple = (0.4, 0.9),
    in_place: bool = False,
) -> torch.Tensor:
    """``gibbs_ringing`` with ``keep_fraction ~ U(keep_fraction)``, each sample with probability ``p``."""
    if p <= 0:
        return images
    batch, device = images.shape[0], images.device
    selected = draw_selection(batch, p, generator, device)
    fractions = uniform((batch,), *keep_fraction, generator, device)
    return apply_to_selected(images, selected, gibbs_ringing, fractions, in_place=in_place)


def random_spike(
    images: torch.Tensor, generator: torch.Generator, p: float = 0.1, intensity: tuple = (0.1, 0.5),
    in_place: bool = False,
) -> torch.Tensor:
    """``add_spike`` at a uniformly drawn non-DC k-space location with ``intensity ~ U(intensity)``."""
    if p <= 0:
        return images
    batch, device = images.shape[0], images.device
    height, width = images.shape[-2:]
    selected = draw_selection(batch, p, generator, device)
    locations = torch.randint(1, height * width, (batch,), generator=generator, device=device)
    intensities = uniform((batch,), *intensity, generator, device)
    return apply_to_selected(images, selected, add_spike, locations, intensities, in_place=in_place)


def random_ghosting(
    images: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.1,
    ghost_count: tuple = (2, 6),
    intensity: tuple = (0.1, 0.5),
    in_place: bool = False,
) -> torch.Tensor:
    """``add_ghosting`` with ``n`` uniform in ``ghost_count`` (inclusive), ``intensity ~ U(intensity)``, random axis."""
    if p <= 0:
        return images
    if ghost_count[0] < 1 or ghost_count[0] > ghost_count[1]:
        raise ValueError(f"ghost_count range must satisfy 1 <= low <= high, got {ghost_count}")
    batch, device = images.shape[0], images.device
    selected = draw_selection(batch, p, generator, device)
    counts = torch.randint(int(ghost_count[0]), int(ghost_count[1]) + 1, (batch,), generator=generator, device=device)
    intensities = uniform((batch,), *intensity, generator, device)
    axes = torch.randint(0, 2, (batch,), generator=generator, device=device)
    return apply_to_selected(images, selected, add_ghosting, counts, intensities, axes, in_place=in_place)


def random_noise(
    images: torch.Tensor, generator: torch.Generator, p: float = 0.3, std: tuple = (0.0, 0.05),
    in_place: bool = False,
) -> torch.Tensor:
    """Add Gaussian noise with per-sample ``std ~ U(std)``, each sample with probability ``p``.

    Noise is drawn (after the standard deviations) for the rows ``apply_to_selected`` computes.
    """
    if p <= 0:
        return images
    batch, device = images.shape[0], images.device
    selected = draw_selection(batch, p, generator, device)
    stds = uniform((batch,), *std, generator, device).to(images.dtype)

    def add_noise(chosen: torch.Tensor, chosen_stds: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(chosen.shape, generator=generator, device=device, dtype=chosen.dtype)
        return chosen + _per_sample(chosen_stds) * noise

    return apply_to_selected(images, selected, add_noise, stds, in_place=in_place)


def random_blur(
    images: torch.Tensor, generator: torch.Generator, p: float = 0.3, sigma: tuple = (0.1, 1.5),
    in_place: bool = False,
) -> torch.Tensor:
    """``gaussian_blur`` with per-sample ``sigma ~ U(sigma)`` pixels, each sample with probability ``p``."""
    if p <= 0:
        return images
    if sigma[0] <= 0:
        raise ValueError(f"blur sigma range must be positive, got {sigma}")
    batch, device = images.shape[0], images.device
    selected = draw_selection(batch, p, generator, device)
    sigmas = uniform((batch,), *sigma, generator, device)
    radius = math.ceil(3.0 * sigma[1])   # fixed by the range, not by this batch's draws

    def blur(chosen: torch.Tensor, chosen_sigmas: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(chosen, chosen_sigmas, radius)

    return apply_to_selected(images, selected, blur, sigmas, in_place=in_place)


def _copy_on_first_write(images: torch.Tensor, steps) -> torch.Tensor:
    """Run ``steps`` (each ``(images, owned) → images``) in order. Once a step has returned a new tensor, the
    chain owns it and later steps may write into it (``owned=True``): the caller's ``images`` are never modified
    and the batch is copied at most once on the CPU (on a GPU every step returns a new tensor anyway)."""
    original = images
    for step in steps:
        images = step(images, images is not original)
    return images


def augment_acquisition(
    images: torch.Tensor, config: IntensityAugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """What the scanner does to a whole slice: gamma (tissue contrast), bias field (coil sensitivity), Gibbs
    ringing, ghosting and spike (k-space artefacts). Apply it at the slice's own sampling, *before* cropping, so a
    small crop carries the share of the field or ringing pattern that covers it, not a whole head's worth.

    images ``[B, C, H, W]`` float -> same shape (not clamped); ``generator`` must be on ``images.device``.
    """
    check_image_batch(images)
    check_generator(generator, images.device)
    if images.shape[0] == 0:
        return images
    steps = [lambda x, owned: random_gamma(x, generator, config.p_gamma, config.log_gamma, in_place=owned),
             lambda x, owned: random_bias_field(x, generator, config.p_bias_field, config.bias_coefficient,
                                                config.bias_order, in_place=owned),
             lambda x, owned: random_gibbs(x, generator, config.p_gibbs, config.gibbs_keep_fraction, in_place=owned),
             lambda x, owned: random_ghosting(x, generator, config.p_ghosting, config.ghost_count,
                                              config.ghost_intensity, in_place=owned),
             lambda x, owned: random_spike(x, generator, config.p_spike, config.spike_intensity, in_place=owned)]
    return _copy_on_first_write(images, steps)


def augment_appearance(
    images: torch.Tensor, config: IntensityAugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """What happens at the crop's own resolution: blur, noise, intensity scale/shift, then a clamp to
    ``OUTPUT_RANGE``. images ``[B, C, H, W]`` float -> same shape."""
    check_image_batch(images)
    check_generator(generator, images.device)
    if images.shape[0] == 0:
        return images.clamp(*OUTPUT_RANGE)
    steps = [lambda x, owned: random_blur(x, generator, config.p_blur, config.blur_sigma, in_place=owned),
             lambda x, owned: random_noise(x, generator, config.p_noise, config.noise_std, in_place=owned),
             lambda x, owned: random_contrast(x, generator, config.p_contrast, config.scale, config.shift,
                                              in_place=owned)]
    images = _copy_on_first_write(images, steps)
    return images.clamp(*OUTPUT_RANGE)


def augment_intensity(
    images: torch.Tensor, config: IntensityAugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """All intensity augmentations of ``config`` in acquisition order (``augment_acquisition`` then
    ``augment_appearance``), clamped to ``OUTPUT_RANGE``. images ``[B, C, H, W]`` float -> same shape."""
    return augment_appearance(augment_acquisition(images, config, generator), config, generator)
