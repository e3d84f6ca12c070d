"""GPU pretraining throughput: img/s per GPU, MFU and peak memory, sdpa vs xformers, in one run.

Times the full `TrainingStep` (GPU multi-crop + intensity augmentation, iBOT masks, student and teacher forward,
DINO + iBOT + KoLeo, backward, clipping, AdamW, teacher EMA) in bf16 on 224-px slices already on the GPU (the
slice store feeds far faster than this, see bench_store.py), for the ViT-S/16 and ViT-B/16 configs with
2×224 + 8×96 crops. MFU counts matmul FLOPs of the transformer blocks (student fwd+bwd on all crops = 3× forward,
teacher forward on the global crops) against the GPU's dense bf16 peak (--peak-tflops, default H100/H200 989).

    python bench/bench_gpu_throughput.py [--batch-size 128] [--steps 20] [--archs vit_small,vit_base]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from braindino.models import PRESETS, xformers_available
from braindino.train.config import load_config
from braindino.train.data import StepBatch, ibot_mask_sampler, step_masks
from braindino.train.distributed import DistInfo
from braindino.train.step import TrainingStep, build_training

ROOT = Path(__file__).resolve().parents[1]


def transformer_flops(tokens: int, dim: int, depth: int) -> float:
    """Forward FLOPs of ``depth`` ViT blocks on one image of ``tokens`` tokens (qkv, proj, MLP 4×, attention)."""
    return depth * (24 * tokens * dim ** 2 + 4 * tokens ** 2 * dim)


def flops_per_image(config) -> float:
    preset = PRESETS[config.model.arch]
    extra = 1 + config.model.num_register_tokens
    global_tokens = (config.crops.global_size // config.model.patch_size) ** 2 + extra
    local_tokens = (config.crops.local_size // config.model.patch_size) ** 2 + extra
    per_crop = {n: transformer_flops(n, preset["embed_dim"], preset["depth"]) for n in (global_tokens, local_tokens)}
    student = 3 * (2 * per_crop[global_tokens] + config.crops.n_local * per_crop[local_tokens])
    teacher = 2 * per_crop[global_tokens]
    return student + teacher


def measure(arch: str, attn: str, batch_size: int, steps: int) -> dict:
    config = load_config(ROOT / "configs" / f"dino_{arch}.yaml",
                         [f"model.attn={attn}", f"optim.global_batch_size={batch_size}", "train.precision=bf16",
                          "optim.iters=100000"])
    device = torch.device("cuda")
    training = build_training(config, DistInfo(rank=0, world_size=1, local_rank=0, device=device))
    run_step = TrainingStep(config, training, DistInfo(rank=0, world_size=1, local_rank=0, device=device))
    slices = torch.rand(batch_size, 1, 224, 224, dtype=torch.float16).pin_memory()
    sampler = ibot_mask_sampler(config)

    def loader_batch(step):   # what a DataLoader worker hands over: pinned slices and masks made off the GPU path
        masks = step_masks(sampler, 2 * batch_size, int(config.seed), step, 0)
        return StepBatch(slices, None if masks is None else masks.pin_memory())

    for step in range(5):
        run_step(step + 2000, loader_batch(step + 2000))
    batches = [loader_batch(step + 3000) for step in range(steps)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        run_step(step + 3000, batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    img_per_s = batch_size * steps / seconds
    return {"img_per_s": img_per_s, "tflops": img_per_s * flops_per_image(config) / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128, help="images per step on the one GPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--archs", default="vit_small,vit_base")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu_throughput.py needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    backends = ["sdpa"] + (["xformers"] if xformers_available() else [])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch_size}, bf16, "
          f"2x224 + 8x96 crops")
    print(f"{'arch':10} {'attn':9} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    results = {}
    for arch in args.archs.split(","):
        for attn in backends:
            r = results[arch, attn] = measure(arch, attn, args.batch_size, args.steps)
            print(f"{arch:10} {attn:9} {r['img_per_s']:8.0f} {r['tflops']:8.0f} "
                  f"{r['tflops'] / args.peak_tflops:6.1%} {r['peak_gib']:9.1f}")
            print(f"BENCH | GPU pretraining {arch}/16, {attn}, bf16 | {r['img_per_s']:,.0f} img/s, MFU "
                  f"{r['tflops'] / args.peak_tflops:.1%}, peak {r['peak_gib']:.1f} GiB | "
                  f"{'≥ 1,000 img/s' if arch == 'vit_base' else '—'}")
        if "xformers" in backends:
            ratio = results[arch, "xformers"]["img_per_s"] / results[arch, "sdpa"]["img_per_s"]
            print(f"{arch:10} xformers / sdpa speed ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
