"""The pretraining loop: one process per device, the same code for one CPU, one GPU or many nodes.

Reads this process's part of each global batch from the slice store, runs ``TrainingStep``, enforces the
NaN/Inf policy, logs losses and collapse monitors, and writes resumable checkpoints.

Stopping early: on SIGTERM or SIGUSR1 (a scheduler's pre-emption notice) or once ``train.max_hours`` have passed,
every process finishes its current step, rank 0 writes a checkpoint of it, and ``train`` returns a summary whose
``stopped`` names the reason (``--resume`` then continues bit-identically).
"""

import functools
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from braindino import monitors
from braindino.atomic import atomic_write_json
from braindino.errors import InputError
from braindino.store import SliceStore
from braindino.train import checkpoint as ckpt
from braindino.train.config import save_config
from braindino.train.data import batches_checked_against, step_loader
from braindino.train.distributed import agree_max, barrier, init_distributed
from braindino.train.metrics_log import MetricsLog
from braindino.train.online_knn import OnlineKNN
from braindino.train.step import TrainingStep, build_training


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_consecutive_nonfinite`` steps in a row produced NaN/Inf losses or gradients."""


class StopRequests:
    """Pre-emption signals and the ``train.max_hours`` deadline, turned into a stop after the current step.

    The signal handler only records the signal; ``agreed()``, called by every process after each step, returns
    the reason any of them has to stop ("SIGTERM", "train.max_hours=...") or None, so all ranks stop together.
    """

    def __init__(self, max_hours: float):
        self.max_hours = max_hours
        self.deadline = time.monotonic() + max_hours * 3600 if max_hours > 0 else None
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # Python sets handlers there only
            self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum, _frame):
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def agreed(self) -> str | None:
        local = 2 if self.signal_name else 1 if self.deadline and time.monotonic() >= self.deadline else 0
        reason = agree_max(local)
        if reason == 2:
            return self.signal_name or "a pre-emption signal to another process"
        return f"train.max_hours={self.max_hours:g}" if reason == 1 else None


def _ignore_stop_signals(worker_id: int, then=None) -> None:
    """DataLoader worker init: a scheduler signals every process of a job; workers leave stopping to the trainer."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def collapse_monitors(student_out: dict, extra: dict, config, teacher_temp: float) -> dict:
    """Teacher entropy, student–teacher KL, prototype usage, CLS feature std and effective rank; for DINO also the
    teacher logits' spread across slices ÷ ``teacher_temp`` and their first direction's share of the variance."""
    cls = student_out["cls"].detach().float()
    values = {"feature_std": monitors.feature_std(cls), "effective_rank": monitors.effective_rank(cls)}
    if "teacher_probs" in extra:
        probs, logits = extra["teacher_probs"].detach(), extra["student_logits"].detach()
        values.update(teacher_entropy=monitors.teacher_entropy(probs),
                      mean_probability_entropy=monitors.mean_probability_entropy(probs),
                      student_teacher_kl=monitors.student_teacher_kl(probs, logits, config.dino.student_temp),
                      prototype_usage=monitors.prototype_usage(probs))
    if "teacher_logits" in extra:
        teacher_logits = extra["teacher_logits"].detach()
        values.update(teacher_logit_spread_over_temp=monitors.logit_spread(teacher_logits) / teacher_temp,
                      teacher_top_direction_share=monitors.top_direction_share(teacher_logits))
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


def load_resume_checkpoint(path) -> dict:
    """``load_checkpoint``, naming the newest intact earlier checkpoint when ``path`` is damaged."""
    try:
        return ckpt.load_checkpoint(path)
    except InputError as err:
        intact = ckpt.newest_intact_before(path)
        if intact is None:
            raise
        raise InputError(path, err.cause, f"the newest intact earlier checkpoint is {intact}: move {Path(path).name} "
                         f"away (e.g. rename it to {Path(path).name}.damaged) and rerun with --resume") from None


def save_checkpoint(training, provenance: dict, done: int, run_dir: Path, config, is_main: bool) -> Path | None:
    """Gather the full training state (a collective), rank 0 writes it; all ranks raise if that write failed."""
    state = ckpt.gather_training_state(training.student, training.teacher, training.optimizer,
                                       training.objective, done)
    state["provenance"] = {**provenance, "steps": done}
    path, failure = None, None
    if is_main:
        try:
            path = ckpt.write_checkpoint(run_dir, state, config.train.keep_last)
            atomic_write_json(run_dir / "provenance.json", state["provenance"])
        except Exception as err:   # full disk, NaN weights: the other ranks must not wait for rank 0 forever
            failure = err
    if agree_max(int(failure is not None)):
        raise failure or RuntimeError("rank 0 could not write the checkpoint (its error line says why)")
    return path


class SkipCounter:
    """Skipped (non-finite) steps counted on the device, so that no step waits for the host to know.

    ``add(flag)`` after every step (0-dim float, 1.0 = skipped); ``read()`` → (longest run of consecutive skips
    since the last read, skips since the last read), a host sync: call it on log and checkpoint steps only.
    """

    def __init__(self, device: torch.device):
        self.run = torch.zeros((), device=device)
        self.longest = torch.zeros((), device=device)
        self.count = torch.zeros((), device=device)

    def add(self, flag: torch.Tensor) -> None:
        self.run = (self.run + flag) * flag
        self.longest = torch.maximum(self.longest, self.run)
        self.count = self.count + flag

    def read(self) -> tuple[int, int]:
        longest, count = (int(value) for value in torch.stack([self.longest, self.count]).tolist())
        self.longest = self.run.clone()   # a run still going on carries over into the next window
        self.count = torch.zeros_like(self.count)
        return longest, count


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


def knn_record(name: str, score) -> dict:
    """A ``KNNScore`` as metrics: ``name`` (the accuracy), ``name_low`` / ``name_high`` (its 95 % interval)."""
    return {name: score.accuracy, f"{name}_low": score.low, f"{name}_high": score.high}


def train(config, data_dir, run_dir, resume=None) -> dict:
    """Pretrain on the slice store at ``data_dir``; checkpoints, metrics and config go to ``run_dir``.

    ``resume``: None (fresh run), ``"latest"`` (latest checkpoint in ``run_dir``, fresh if none) or a checkpoint
    path. Returns a summary dict (also written to ``run_dir/summary.json`` by rank 0); its ``stopped`` is None
    after the last step, else why the run stopped early with a checkpoint (signal, ``train.max_hours``).
    """
    with StopRequests(float(config.train.max_hours)) as stop_requests:
        return _train(config, data_dir, run_dir, resume, stop_requests)


def _train(config, data_dir, run_dir, resume, stop_requests: StopRequests) -> dict:
    dist_info = init_distributed()
    device, run_dir = dist_info.device, Path(run_dir)
    store = SliceStore(data_dir)
    training = build_training(config, dist_info)
    checkpoint_path = resume_point(run_dir, resume)
    start_step = 0
    if checkpoint_path is not None:
        start_step = ckpt.restore_training_state(load_resume_checkpoint(checkpoint_path), training.student,
                                                 training.teacher, training.optimizer, training.objective)
    provenance = ckpt.training_provenance(config, store, OmegaConf.to_yaml(config, resolve=True))
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        (run_dir / "summary.json").unlink(missing_ok=True)   # it describes this run's outcome once written
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
    first_losses, last_losses, last_monitors, steps_timed = None, None, {}, 0
    skips = SkipCounter(device)
    fixed_point = monitors.FixedPointWatch(int(config.train.fixed_point_patience))
    done, stopped, checkpoint_path = start_step, None, None
    loader = step_loader(store, config, dist_info.rank, dist_info.world_size, start_step)
    loader.worker_init_fn = functools.partial(_ignore_stop_signals, then=loader.worker_init_fn)
    if knn is not None and start_step == 0:   # the baseline every later kNN value is read against
        log.log(0, knn_record("monitor/knn_accuracy_init", knn.accuracy(embed, device, config.crops.global_size)))
    started = step_clock = time.perf_counter()
    for step, batch in zip(range(start_step, iters), batches_checked_against(loader, store)):
        result = run_step(step, batch)
        skips.add(result.skipped_flag)
        progress.update(1)
        done = step + 1
        steps_timed += 1
        monitor_due = done % config.train.monitor_every == 0 or done == iters
        knn_due = knn is not None and (done % config.train.knn_every == 0 or done == iters)
        # the only places the host reads the device: log, monitor and checkpoint steps, the last step
        if (done % config.train.log_every == 0 or done % config.train.checkpoint_every == 0 or done == iters
                or monitor_due or knn_due):
            longest_run, skipped = skips.read()
            if longest_run >= config.train.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"step {step}: non-finite loss or gradient for {longest_run} steps in a row (last losses "
                    f"{result.losses}, grad norm {result.grad_norm}); no checkpoint written — lower "
                    f"optim.base_lr, raise optim.warmup_iters or use train.precision=fp32")
            if not result.applied:
                log.log(step, {"skipped_nonfinite": skipped, **{f"loss/{k}": v for k, v in result.losses.items()}})
            else:
                last_losses = result.losses
                first_losses = first_losses or last_losses
                if monitor_due:
                    values = collapse_monitors(result.student_out, result.extra, config,
                                               result.scheduled["teacher_temp"])
                    last_monitors = {f"monitor/{k}": v for k, v in values.items()}
                    warning = ("teacher_logit_spread_over_temp" in values and fixed_point.update(
                        done, values["teacher_logit_spread_over_temp"], values["teacher_top_direction_share"]))
                    if warning and dist_info.is_main:
                        progress.write(warning, file=sys.stderr)
                if knn_due:
                    last_monitors.update(knn_record("monitor/knn_accuracy",
                                                    knn.accuracy(embed, device, config.crops.global_size)))
                img_per_s = local_batch * steps_timed / max(time.perf_counter() - step_clock, 1e-9)
                log.log(step, {**{f"loss/{k}": v for k, v in last_losses.items()}, **result.scheduled,
                               "grad_norm": result.grad_norm, "img_per_s_per_device": img_per_s,
                               "img_per_s": img_per_s * dist_info.world_size,
                               "peak_memory_mb": peak_memory_mb(device), **last_monitors,
                               **({"skipped_nonfinite": skipped} if skipped else {})})
                progress.set_postfix(loss=f"{last_losses['total']:.3f}",
                                     img_s=f"{img_per_s * dist_info.world_size:.0f}")
                last_monitors, steps_timed, step_clock = {}, 0, time.perf_counter()
        del result   # the next step must not run with this one's activations and logits still alive
        stopped = stop_requests.agreed()
        if done % config.train.checkpoint_every == 0 or done == iters or stopped:
            checkpoint_path = save_checkpoint(training, provenance, done, run_dir, config, dist_info.is_main)
        if stopped:
            break
    progress.close()
    log.close()
    summary = {"objective": config.objective, "attention": training.attention, "world_size": dist_info.world_size,
               "device": str(device), "precision": "bf16" if training.bf16 else "fp32",
               "steps_run": done - start_step, "first_losses": first_losses, "last_losses": last_losses,
               "seconds": round(time.perf_counter() - started, 2), "stopped": stopped, "next_step": done,
               "checkpoint": None if checkpoint_path is None else str(checkpoint_path)}
    if dist_info.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary
