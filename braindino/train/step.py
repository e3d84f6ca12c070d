"""One optimisation step of self-supervised pretraining, and the networks and optimiser it updates.

``TrainingStep(step, batch)``: apply the step's scheduled lr / weight decay → multi-crop + intensity augmentation
on the device → student and teacher forward (iBOT masks come with the batch, made by the data loader) → weighted
loss → backward, gradient clipping, last-layer freeze → fused AdamW → teacher EMA. Everything random in a step is
seeded from (seed, step, rank), so a resumed run continues bit-identically.

The step never reads a value back from the device: a NaN/Inf loss or gradient norm (on any process) is a device
flag that makes the fused optimiser skip its update (``found_inf``, the mechanism of ``torch.amp.GradScaler``), the
teacher EMA use momentum 1, and the loss state keep its previous value. Losses, the gradient norm and the flag stay
on the device in ``StepResult`` until a log step reads them, so a GPU never waits for the host between log steps.
"""

import contextlib
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from braindino.augment import IntensityAugmentConfig, MultiCropAugmentation, MultiCropConfig
from braindino.models import build_backbone, load_pretrained_backbone, parameter_groups, set_attention_backend
from braindino.models.init_from import IMAGENET_MEAN, IMAGENET_STD
from braindino.train.data import StepBatch, ibot_mask_sampler, step_masks, step_seed
from braindino.train.dino import DINOObjective, build_dino_networks, update_teacher
from braindino.train.distributed import DistInfo
from braindino.train.schedules import build_schedules
from braindino.train.simclr import SimCLRObjective, build_simclr_network


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
        normalisation = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "none": (None, None)}
        load_pretrained_backbone(backbone, model.init_from, *normalisation[model.init_from_normalisation])
    backbone.set_grad_checkpointing(model.grad_checkpointing)
    attn = set_attention_backend(backbone, model.attn)
    if config.train.compile:   # block by block: one graph serves student, teacher, global and local crops
        for block in backbone.vit.blocks:
            block.compile()
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


@dataclass
class Training:
    """What a run updates: the (wrapped) student, its unwrapped module, teacher, objective state, optimiser."""
    student: torch.nn.Module           # DDP / FSDP-wrapped when world_size > 1
    student_module: torch.nn.Module    # the same network unwrapped (attribute access, EMA source)
    teacher: torch.nn.Module | None    # None for SimCLR
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    attention: str                     # attention backend in use
    bf16: bool


def build_training(config, dist_info: DistInfo) -> Training:
    device = dist_info.device
    torch.manual_seed(config.seed)   # identical initial weights on every process
    bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and device.type == "cuda")
    if bf16 and device.type != "cuda":
        raise ValueError("precision=bf16 needs a CUDA device; use train.precision=fp32 on CPU")
    student, teacher, objective, attention = build_networks(config, device)
    wrapped = wrap_for_distributed(student, teacher, config, dist_info, bf16)
    groups = parameter_groups(student, weight_decay=1.0, layer_decay=config.optim.layer_decay,
                              patch_embed_lr_multiplier=config.optim.patch_embed_lr_multiplier)
    # fused: one kernel per step on CUDA and CPU, and it honours a device-side ``found_inf`` (see the module doc)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(config.optim.betas), fused=True)
    return Training(wrapped, student, teacher, objective, optimizer, attention, bf16)


@dataclass
class StepResult:
    """A step's outcome, its numbers still on the device; the properties read them back (a host sync)."""
    loss_terms: dict        # term name → 0-dim tensor, plus "total"
    scheduled: dict         # lr, weight_decay, teacher_momentum, teacher_temp used (Python floats)
    grad_norm_tensor: torch.Tensor   # 0-dim
    skipped_flag: torch.Tensor       # 0-dim float: 1.0 = NaN/Inf loss or gradient on some process, state kept
    student_out: dict       # network outputs (for the collapse monitors)
    extra: dict             # objective's teacher probabilities / student logits (for the monitors)

    @property
    def losses(self) -> dict:
        return {name: float(value) for name, value in self.loss_terms.items()}

    @property
    def grad_norm(self) -> float:
        return float(self.grad_norm_tensor)

    @property
    def applied(self) -> bool:
        return not bool(self.skipped_flag)


def any_process(flag: torch.Tensor) -> torch.Tensor:
    """0-dim float flag → its maximum over all processes (an all-reduce, no host sync)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


class TrainingStep:
    """Callable ``(step, batch) → StepResult`` over a ``Training``; ``batch`` is a ``StepBatch`` from the data
    loader, or a bare ``[B_local, 1, H, W]`` tensor (its iBOT masks are then drawn here, identically)."""

    def __init__(self, config, training: Training, dist_info: DistInfo):
        self.config = config
        self.training = training
        self.device = dist_info.device
        self.rank = dist_info.rank
        self.schedules = build_schedules(config)
        self.augment = MultiCropAugmentation(multicrop_config(config))
        self.mask_sampler = ibot_mask_sampler(config)
        self.last_layer = (training.student_module.last_layer_parameters() if training.teacher is not None else [])
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if training.bf16 else contextlib.nullcontext()

    def __call__(self, step: int, batch: StepBatch | torch.Tensor) -> StepResult:
        config, t = self.config, self.training
        if isinstance(batch, torch.Tensor):
            batch = StepBatch(batch, step_masks(self.mask_sampler, 2 * batch.shape[0], config.seed, step, self.rank))
        scheduled = self.schedules.at(step)
        for group in t.optimizer.param_groups:
            group["lr"] = scheduled["lr"] * group["lr_multiplier"]
            group["weight_decay"] = scheduled["weight_decay"] * group["wd_multiplier"]
        seed = step_seed(config.seed, step, self.rank)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        crops = self.augment(batch.slices.to(self.device, non_blocking=True).float(), generator)
        masks = None if batch.masks is None else batch.masks.to(self.device, non_blocking=True)
        torch.manual_seed(seed)   # drop path
        objective_state = {k: v.clone() for k, v in t.objective.state_dict().items()}

        with self.autocast:
            student_out = t.student(crops["global"], crops["local"], masks)
            teacher_out = t.teacher(crops["global"], masks) if t.teacher is not None else None
            total, terms, extra = t.objective(student_out, teacher_out, masks, scheduled["teacher_temp"], 2,
                                                 scheduled["contrastive_share"])
        t.optimizer.zero_grad(set_to_none=True)
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(t.student.parameters(), config.optim.clip_grad)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        total = total.detach()
        skipped = any_process((~(torch.isfinite(total) & torch.isfinite(norm))).float())
        if step < config.dino.freeze_last_layer_iters:
            for parameter in self.last_layer:
                parameter.grad = None
        t.optimizer.found_inf, t.optimizer.grad_scale = skipped, None   # fused AdamW: skip the update on the device
        t.optimizer.step()
        kept = skipped.bool()
        for name, value in t.objective.state_dict().items():   # a skipped step leaves the teacher centres as they were
            value.copy_(torch.where(kept, objective_state[name], value))
        if t.teacher is not None:
            update_teacher(t.student_module, t.teacher,
                           torch.where(kept, 1.0, scheduled["teacher_momentum"]).to(torch.float32))
        loss_terms = {name: value.detach() for name, value in terms.items()} | {"total": total}
        return StepResult(loss_terms, scheduled, norm.detach(), skipped, student_out, extra)
