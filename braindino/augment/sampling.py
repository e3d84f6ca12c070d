"""Random draws for the augmentations: explicit ``torch.Generator``, tensors created on the images' device.

A ``torch.Generator`` produces numbers only on its own device type, so the generator passed to any augmentation
must live where the images live: ``torch.Generator()`` for CPU tensors, ``torch.Generator(device="cuda")`` for CUDA
tensors. The same generator state and inputs give identical outputs; CPU and CUDA streams differ from each other.
"""

from __future__ import annotations

import torch


def check_generator(generator: torch.Generator, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``generator`` can produce numbers on ``device`` (same device type)."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"expected a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device.type!r} but the images are on {device.type!r}; "
            f"create it with torch.Generator(device={device.type!r}).manual_seed(seed)"
        )


def check_image_batch(images: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is a floating-point ``[B, C, H, W]`` tensor."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"expected floating-point images of shape [B, C, H, W], got {tuple(images.shape)} {images.dtype}"
        )


def uniform(
    shape: tuple[int, ...],
    low: float,
    high: float,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Float32 tensor of ``shape`` with values drawn uniformly from ``[low, high)``."""
    if low > high:
        raise ValueError(f"range ({low}, {high}) has its lower bound above its upper bound")
    draws = torch.rand(shape, generator=generator, device=device)
    return low + (high - low) * draws


def draw_selection(
    batch_size: int, probability: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor | None:
    """``[B]`` bool: which samples an augmentation applies to, each with ``probability``.

    Returns ``None`` when ``probability >= 1`` (every sample; nothing is drawn).
    """
    if probability >= 1.0:
        return None
    return torch.rand((batch_size,), generator=generator, device=device) < probability


GATHER_ON_CPU = True
"""Whether CPU batches gather their selected rows (see ``apply_to_selected``); tests turn it off to check, on a CPU,
the code path a GPU takes."""


def apply_to_selected(images: torch.Tensor, selected: torch.Tensor | None, operation, *parameters,
                      in_place: bool = False) -> torch.Tensor:
    """``operation(images, *parameters)`` on the selected rows; the other rows pass through unchanged.

    images: ``[B, C, H, W]``; selected: ``[B]`` bool or ``None`` (all rows); every parameter has leading dim ``B``.
    ``in_place``: the caller owns ``images`` and lets the CPU path write the selected rows into it (a chain of
    augmentations copies the batch once, not once per step); ``images`` is never modified otherwise.
    On a GPU the operation runs on every row and ``torch.where`` picks the result per row: gathering the selected
    rows would need their number on the host, a sync that makes the GPU wait. On the CPU there is nothing to wait
    for, so the selected rows are gathered and the others cost nothing (``GATHER_ON_CPU``).
    """
    if selected is None:
        return operation(images, *parameters)
    if images.device.type == "cpu" and GATHER_ON_CPU:
        index = selected.nonzero().squeeze(1)
        if index.numel() == 0:
            return images
        result = images if in_place else images.clone()
        result[index] = operation(images[index], *(parameter[index] for parameter in parameters))
        return result
    return torch.where(selected.view(-1, *([1] * (images.dim() - 1))), operation(images, *parameters), images)
