"""Throughput of the DINO multi-crop augmentation: source slices per second, CPU and (when present) CUDA.

    python bench/bench_augment.py [--batch 64] [--size 224] [--iters 5]

Each batch of ``--batch`` slices of ``--size`` px becomes 2 global crops of 224 px and 8 local crops of 96 px with
the default intensity augmentations (``MultiCropConfig()``). Prints one line per device, then the CUDA/CPU ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from braindino.augment import MultiCropAugmentation, MultiCropConfig


def brain_like_slices(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, 1, size, size]`` textured ellipses on a black background, values in ``[0, 1]``."""
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    inside = ((rows / 0.8) ** 2 + (cols / 0.65) ** 2 <= 1).float()
    return inside * (0.3 + 0.7 * torch.rand((batch, 1, size, size), generator=generator))


def images_per_second(device: torch.device, batch: int, size: int, iters: int) -> float:
    """Source slices augmented per second on ``device`` (after one warm-up batch)."""
    augment = MultiCropAugmentation(MultiCropConfig())
    images = brain_like_slices(batch, size, torch.Generator().manual_seed(0)).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    augment(images, generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(iters):
        views = augment(images, generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    assert views["global"].shape[0] == 2 * batch and views["local"].shape[0] == 8 * batch
    return batch * iters / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="slices per batch (default 64)")
    parser.add_argument("--size", type=int, default=224, help="source slice size in px (default 224)")
    parser.add_argument("--iters", type=int, default=5, help="timed batches per device (default 5)")
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rates = {}
    for device in devices:
        iters = args.iters * (20 if device.type == "cuda" else 1)
        rates[device.type] = images_per_second(device, args.batch, args.size, iters)
        print(f"{device.type:>4}: {rates[device.type]:9.1f} img/s  (B={args.batch}, {args.size} px -> 2x224 + 8x96, "
              f"{torch.get_num_threads()} CPU threads)")
    if "cuda" in rates:
        print(f"cuda/cpu ratio: {rates['cuda'] / rates['cpu']:.1f}x")
    for device, rate in rates.items():
        print(f"BENCH | multi-crop + intensity augmentation on {device} (B={args.batch}, {args.size} px) | "
              f"{rate:,.0f} img/s | —")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
