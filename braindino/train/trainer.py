"""The pretraining loop: one process per device, the same code for one CPU, one GPU or many nodes.

Per step: read this process's part of the global batch → multi-crop + intensity augmentation on the device →
student and teacher forward → weighted loss → (skip on NaN/Inf) → backward, clip, AdamW → teacher EMA.
Everything random in a step is seeded from (seed, step, rank), so a resumed run continues bit-identically.
"""

import contextlib
import math
import resource
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from braindino import monitors
from braindino.augment import IntensityAugmentConfig, MultiCropAugmentation, MultiCropConfig, sample_batch_masks
from braindino.models import build_backbone, load_pretrained_backbone, parameter_groups, set_attention_backend
from braindino.store import SliceStore
from braindino.train import checkpoint as ckpt
from braindino.train.config import save_config
from braindino.train.data import step_loader
from braindino.train.dino import DINOObjective, build_dino_networks, update_teacher
from braindino.train.distributed import DistInfo, all_reduce_max, barrier, init_distributed
from braindino.train.metrics_log import MetricsLog
from braindino.train.online_knn import OnlineKNN
from braindino.train.schedules import build_schedules
from braindino.train.simclr import SimCLRObjective, build_simclr_network


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_consecutive_nonfinite`` steps in a row produced NaN/Inf losses or gradients."""


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for everything random in one step of one process."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint64)[0] >> 1)


def multicrop_config(config) -> MultiCropConfig:
    crops = config.crops
    known = {f.name for f in fields(IntensityAugmentConfig)}
    unknown = set(config.intensity) - known
    if unknown:
        raise ValueError(f"unknown intensity augmentation settings: {sorted(unknown)}")
    intensity = IntensityAugmentConfig(**{k: (tuple(v) if OmegaConf.is_list(v) else v)
                                          for k, v in config.intensity.items()})
    return MultiCropConfig(
        global_size=crops.global_size, local_size=crops.local_size, n_global=2,
        n_local=0 if config.objective == "simclr" else crops.n_local,
        global_scale=tuple(crops.global_scale), local_scale=tuple(crops.local_scale),
        flip_p=crops.flip_p, max_rotation_deg=crops.max_rotation_deg, intensity=intensity)


def build_networks(config, device: torch.device):
    """→ (student, teacher or None, objective, attention backend actually used)."""
    model = config.model
    backbone = build_backbone(model.arch, patch_size=model.patch_size, img_size=config.crops.global_size,
                              in_chans=1, num_register_tokens=model.num_register_tokens,
                              drop_path_rate=model.drop_path_rate, layerscale_init=model.layerscale_init,
                              depth=model.depth)
    if model.init_from:
        load_pretrained_backbone(backbone, model.init_from)
    attn = set_attention_backend(backbone, model.attn)
    if config.objective == "dino":
        student, teacher = build_dino_networks(config, backbone)
        objective = DINOObjective(config)
    else:
        student, teacher, objective = build_simclr_network(config, backbone), None, SimCLRObjective(config)
    student.to(device).train()
    objective.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    return student, teacher, objective, attn


def wrap_for_distributed(student, teacher, config, dist_info: DistInfo, bf16: bool):
    """DDP (default) or FSDP2 ``fully_shard`` on every transformer block and the whole network."""
    if dist_info.world_size == 1:
        return student
    if config.train.distributed == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for network in (student, teacher) if teacher is not None else (student,):
            for block in network.backbone.vit.blocks:
                fully_shard(block, mp_policy=policy)
            fully_shard(network, mp_policy=policy)
        return student
    device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(student, device_ids=device_ids)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def collapse_monitors(student_out: dict, extra: dict, config) -> dict:
    """Teacher entropy, student–teacher KL, prototype usage, CLS feature std and effective rank."""
    cls = student_out["cls"].detach().float()
    values = {"feature_std": monitors.feature_std(cls), "effective_rank": monitors.effective_rank(cls)}
    if "teacher_probs" in extra:
        probs, logits = extra["teacher_probs"].detach(), extra["student_logits"].detach()
        values.update(teacher_entropy=monitors.teacher_entropy(probs),
                      mean_probability_entropy=monitors.mean_probability_entropy(probs),
                      student_teacher_kl=monitors.student_teacher_kl(probs, logits, config.dino.student_temp),
                      prototype_usage=monitors.prototype_usage(probs))
    return values


def train(config, data_dir, run_dir, resume=None) -> dict:
    """Pretrain on the slice store at ``data_dir``; checkpoints, metrics and config go to ``run_dir``.

    ``resume``: None (fresh run; refuses a run directory that already has checkpoints), ``"latest"`` or a
    checkpoint path. Returns a summary dict (also written to ``run_dir/summary.json`` by rank 0).
    """
    dist_info = init_distributed()
    device = dist_info.device
    run_dir = Path(run_dir)
    torch.manual_seed(config.seed)   # identical initial weights on every process
    bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and device.type == "cuda")
    if bf16 and device.type != "cuda":
        raise ValueError("precision=bf16 needs a CUDA device; use train.precision=fp32 on CPU")

    store = SliceStore(data_dir)
    student, teacher, objective, attn = build_networks(config, device)
    student_module = student
    student = wrap_for_distributed(student, teacher, config, dist_info, bf16)
    groups = parameter_groups(student_module, weight_decay=1.0, layer_decay=config.optim.layer_decay,
                              patch_embed_lr_multiplier=config.optim.patch_embed_lr_multiplier)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(config.optim.betas))

    start_step = 0
    checkpoint_path = ckpt.latest_checkpoint(run_dir) if resume == "latest" else resume
    if resume is None and ckpt.latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds checkpoints; pass --resume to continue it or pick a new --out")
    if checkpoint_path is not None:
        start_step = ckpt.restore_training_state(ckpt.load_checkpoint(checkpoint_path), student, teacher,
                                                 optimizer, objective)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    barrier()

    iters = int(config.optim.iters)
    schedules = build_schedules(config)
    augment = MultiCropAugmentation(multicrop_config(config))
    grid = (config.crops.global_size // config.model.patch_size,) * 2
    uses_masks = config.objective == "dino" and config.ibot.loss_weight > 0
    log = MetricsLog(run_dir, config, enabled=dist_info.is_main)
    knn = (OnlineKNN(store, config.train.knn_label, config.train.knn_slices_per_volume, config.seed)
           if config.train.knn_label and config.train.knn_every > 0 else None)
    last_layer = student_module.dino_head.last_layer_parameters() if teacher is not None else []
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
    local_batch = int(config.optim.global_batch_size) // dist_info.world_size

    progress = tqdm(total=iters, initial=start_step, disable=not (dist_info.is_main and config.train.progress),
                    desc="pretrain", unit="step", dynamic_ncols=True)
    first_losses, last_losses, skipped_in_a_row, last_monitors, steps_timed = None, None, 0, {}, 0
    started = step_clock = time.perf_counter()
    for step, batch in zip(range(start_step, iters), step_loader(store, config, dist_info.rank,
                                                                  dist_info.world_size, start_step)):
        scheduled = schedules.at(step)
        for group in optimizer.param_groups:
            group["lr"] = scheduled["lr"] * group["lr_multiplier"]
            group["weight_decay"] = scheduled["weight_decay"] * group["wd_multiplier"]
        seed = step_seed(config.seed, step, dist_info.rank)
        generator = torch.Generator(device=device).manual_seed(seed)
        images = batch.to(device, non_blocking=True).float()
        crops = augment(images, generator)
        masks = (sample_batch_masks(crops["global"].shape[0], grid, tuple(config.ibot.mask_ratio_range),
                                    config.ibot.mask_sample_probability, np.random.default_rng(seed)).to(device)
                 if uses_masks else None)
        torch.manual_seed(seed)   # drop path
        objective_state = {k: v.clone() for k, v in objective.state_dict().items()}

        with autocast:
            student_out = student(crops["global"], crops["local"], masks)
            teacher_out = teacher(crops["global"], masks) if teacher is not None else None
            total, terms, extra = objective(student_out, teacher_out, masks, scheduled["teacher_temp"], 2)
        losses = {name: float(value.detach()) for name, value in terms.items()}
        losses["total"] = float(total.detach())
        finite = all_reduce_max(0.0 if math.isfinite(losses["total"]) else 1.0, device) == 0.0
        grad_norm = float("nan")
        if finite:
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.optim.clip_grad)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            finite = math.isfinite(grad_norm)
        if not finite:
            objective.load_state_dict(objective_state)
            optimizer.zero_grad(set_to_none=True)
            skipped_in_a_row += 1
            log.log(step, {"skipped_nonfinite": 1, **{f"loss/{k}": v for k, v in losses.items()}})
            if skipped_in_a_row >= config.train.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"step {step}: non-finite loss or gradient for {skipped_in_a_row} steps in a row "
                    f"(losses {losses}, grad norm {grad_norm}); no checkpoint written — lower optim.base_lr, "
                    f"raise optim.warmup_iters or use train.precision=fp32")
            progress.update(1)
            continue
        skipped_in_a_row = 0
        if step < config.dino.freeze_last_layer_iters:
            for parameter in last_layer:
                parameter.grad = None
        optimizer.step()
        if teacher is not None:
            update_teacher(student_module, teacher, scheduled["teacher_momentum"])

        first_losses = first_losses or losses
        last_losses = losses
        steps_timed += 1
        done = step + 1
        if done % config.train.monitor_every == 0 or done == iters:
            last_monitors = {f"monitor/{k}": v for k, v in collapse_monitors(student_out, extra, config).items()}
        if knn is not None and (done % config.train.knn_every == 0 or done == iters):
            backbone = (teacher or student_module).backbone
            last_monitors["monitor/knn_accuracy"] = knn.accuracy(backbone, device, config.crops.global_size)
        if done % config.train.log_every == 0 or done == iters or last_monitors:
            img_per_s = local_batch * steps_timed / max(time.perf_counter() - step_clock, 1e-9)
            log.log(step, {**{f"loss/{k}": v for k, v in losses.items()}, **scheduled, "grad_norm": grad_norm,
                           "img_per_s_per_device": img_per_s,
                           "img_per_s": img_per_s * dist_info.world_size,
                           "peak_memory_mb": peak_memory_mb(device), **last_monitors})
            progress.set_postfix(loss=f"{losses['total']:.3f}", img_s=f"{img_per_s * dist_info.world_size:.0f}")
            last_monitors, steps_timed, step_clock = {}, 0, time.perf_counter()
        if done % config.train.checkpoint_every == 0 or done == iters:
            state = ckpt.gather_training_state(student, teacher, optimizer, objective, done)
            if dist_info.is_main:
                ckpt.write_checkpoint(run_dir, state, config.train.keep_last)
            barrier()
        progress.update(1)
    progress.close()
    log.close()
    summary = {"objective": config.objective, "attention": attn, "world_size": dist_info.world_size,
               "device": str(device), "precision": "bf16" if bf16 else "fp32", "steps_run": iters - start_step,
               "first_losses": first_losses, "last_losses": last_losses,
               "seconds": round(time.perf_counter() - started, 2)}
    if dist_info.is_main:
        from braindino.atomic import atomic_write_json

        atomic_write_json(run_dir / "summary.json", summary)
    return summary
