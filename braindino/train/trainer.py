"""The pretraining loop: one process per device, the same code for one CPU, one GPU or many nodes.

Reads this process's part of each global batch from the slice store, runs ``TrainingStep``, enforces the
NaN/Inf policy, logs losses and collapse monitors, and writes resumable checkpoints.
"""

import resource
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from braindino import monitors
from braindino.atomic import atomic_write_json
from braindino.store import SliceStore
from braindino.train import checkpoint as ckpt
from braindino.train.config import save_config
from braindino.train.data import step_loader
from braindino.train.distributed import barrier, init_distributed
from braindino.train.metrics_log import MetricsLog
from braindino.train.online_knn import OnlineKNN
from braindino.train.step import TrainingStep, build_training


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_consecutive_nonfinite`` steps in a row produced NaN/Inf losses or gradients."""


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


def resume_point(run_dir: Path, resume) -> Path | None:
    """The checkpoint to start from: None for a fresh run, the latest for ``"latest"``, else the given file.

    Refuses a fresh run in a directory with checkpoints, and an explicit checkpoint older than others in the run
    directory (training on would interleave two trajectories under one name).
    """
    latest = ckpt.latest_checkpoint(run_dir)
    if resume is None:
        if latest is not None:
            raise FileExistsError(f"{run_dir} already holds checkpoints; pass --resume to continue it or pick a "
                                  f"new --out")
        return None
    if resume == "latest":
        return latest
    resume = Path(resume)
    if not resume.is_file():
        raise FileNotFoundError(f"{resume}: no such checkpoint file")
    newer = [p for p in ckpt.checkpoint_dir(run_dir).glob("step-*.pt") if p.name > resume.name]
    if newer:
        raise FileExistsError(f"{run_dir} holds checkpoints newer than {resume.name} ({sorted(newer)[-1].name}); "
                              f"move them away before resuming from an earlier step")
    return resume


def knn_embedder(training):
    """``images [B, 1, S, S] → CLS [B, D]`` through the top-level (possibly FSDP-wrapped) network."""
    def embed(images):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=training.bf16):
            if training.teacher is not None:
                return training.teacher(images, cls_only=True)
            training.student.eval()       # SimCLR: the student is the encoder; no drop path while embedding
            cls = training.student(images)["cls"]
            training.student.train()
            return cls
    return embed


def train(config, data_dir, run_dir, resume=None) -> dict:
    """Pretrain on the slice store at ``data_dir``; checkpoints, metrics and config go to ``run_dir``.

    ``resume``: None (fresh run), ``"latest"`` (latest checkpoint in ``run_dir``, fresh if none) or a checkpoint
    path. Returns a summary dict (also written to ``run_dir/summary.json`` by rank 0).
    """
    dist_info = init_distributed()
    device, run_dir = dist_info.device, Path(run_dir)
    store = SliceStore(data_dir)
    training = build_training(config, dist_info)
    checkpoint_path = resume_point(run_dir, resume)
    start_step = 0
    if checkpoint_path is not None:
        start_step = ckpt.restore_training_state(ckpt.load_checkpoint(checkpoint_path), training.student,
                                                 training.teacher, training.optimizer, training.objective)
    provenance = ckpt.training_provenance(config, store, OmegaConf.to_yaml(config, resolve=True))
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        if start_step == 0:   # a fresh run never appends to the metrics of an earlier, abandoned one
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    barrier()

    iters = int(config.optim.iters)
    run_step = TrainingStep(config, training, dist_info)
    log = MetricsLog(run_dir, config, enabled=dist_info.is_main)
    knn = (OnlineKNN(store, config.train.knn_label, config.train.knn_slices_per_volume, config.seed)
           if config.train.knn_label and config.train.knn_every > 0 else None)
    embed = knn_embedder(training)
    local_batch = int(config.optim.global_batch_size) // dist_info.world_size
    progress = tqdm(total=iters, initial=start_step, disable=not (dist_info.is_main and config.train.progress),
                    desc="pretrain", unit="step", dynamic_ncols=True)
    first_losses, last_losses, skipped_in_a_row, last_monitors, steps_timed = None, None, 0, {}, 0
    if knn is not None and start_step == 0:   # the baseline every later kNN value is read against
        log.log(0, {"monitor/knn_accuracy_init": knn.accuracy(embed, device, config.crops.global_size)})
    started = step_clock = time.perf_counter()
    for step, batch in zip(range(start_step, iters), step_loader(store, config, dist_info.rank,
                                                                  dist_info.world_size, start_step)):
        result = run_step(step, batch)
        progress.update(1)
        done = step + 1
        if not result.applied:
            skipped_in_a_row += 1
            log.log(step, {"skipped_nonfinite": 1, **{f"loss/{k}": v for k, v in result.losses.items()}})
            if skipped_in_a_row >= config.train.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"step {step}: non-finite loss or gradient for {skipped_in_a_row} steps in a row "
                    f"(losses {result.losses}, grad norm {result.grad_norm}); no checkpoint written — lower "
                    f"optim.base_lr, raise optim.warmup_iters or use train.precision=fp32")
        else:
            skipped_in_a_row = 0
            first_losses = first_losses or result.losses
            last_losses = result.losses
            steps_timed += 1
            if done % config.train.monitor_every == 0 or done == iters:
                last_monitors = {f"monitor/{k}": v
                                 for k, v in collapse_monitors(result.student_out, result.extra, config).items()}
            if knn is not None and (done % config.train.knn_every == 0 or done == iters):
                last_monitors["monitor/knn_accuracy"] = knn.accuracy(embed, device, config.crops.global_size)
            if done % config.train.log_every == 0 or done == iters or last_monitors:
                img_per_s = local_batch * steps_timed / max(time.perf_counter() - step_clock, 1e-9)
                log.log(step, {**{f"loss/{k}": v for k, v in result.losses.items()}, **result.scheduled,
                               "grad_norm": result.grad_norm, "img_per_s_per_device": img_per_s,
                               "img_per_s": img_per_s * dist_info.world_size,
                               "peak_memory_mb": peak_memory_mb(device), **last_monitors})
                progress.set_postfix(loss=f"{result.losses['total']:.3f}",
                                     img_s=f"{img_per_s * dist_info.world_size:.0f}")
                last_monitors, steps_timed, step_clock = {}, 0, time.perf_counter()
        if done % config.train.checkpoint_every == 0 or done == iters:
            state = ckpt.gather_training_state(training.student, training.teacher, training.optimizer,
                                               training.objective, done)
            state["provenance"] = {**provenance, "steps": done}
            if dist_info.is_main:
                ckpt.write_checkpoint(run_dir, state, config.train.keep_last)
                atomic_write_json(run_dir / "provenance.json", state["provenance"])
            barrier()
    progress.close()
    log.close()
    summary = {"objective": config.objective, "attention": training.attention, "world_size": dist_info.world_size,
               "device": str(device), "precision": "bf16" if training.bf16 else "fp32",
               "steps_run": max(0, iters - start_step), "first_losses": first_losses, "last_losses": last_losses,
               "seconds": round(time.perf_counter() - started, 2)}
    if dist_info.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary
