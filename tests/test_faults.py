"""Faults a cluster user meets, injected into real runs: pre-emption signals, a full disk, errors inside DataLoader
workers, files damaged while a run reads them, a damaged checkpoint on --resume, a wall-clock deadline."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import write_tiny_model
from test_train import CONFIG, ROOT, TINY, assert_states_identical, cli, final_state, tiny_config

from braindino.cli import main as braindino
from braindino.errors import InputError
from braindino.store import SliceStore
from braindino.train import checkpoint as ckpt
from braindino.cli.train import STOPPED_EXIT_STATUS
from braindino.cli.train import main as train_dino
from braindino.train.trainer import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FULL_DISK = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def steps_logged(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0


def start(command, run_dir, min_steps: int):
    """Start a training process in its own session; return it once it has logged ``min_steps`` steps."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                               start_new_session=True, encoding="utf-8", errors="replace")
    deadline = time.time() + 240
    while steps_logged(run_dir) < min_steps and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be disturbed: {process.communicate()[1][-2000:]}"
    return process


def no_temporary_files(folder) -> list:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.suffixes]


def error_lines(text: str, prefix: str = "error:") -> list:
    """The lines of ``text`` from ``prefix`` on (a progress bar left on the console may precede it)."""
    return [line[line.index(prefix):] for line in text.splitlines() if prefix in line]


class FullAfter:
    """A writable file that takes ``room`` bytes, writes part of the next block, then fails like a full disk."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.file.write(data[:self.room])
            self.room = 0
            raise FULL_DISK
        self.room -= len(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()


# ---------------------------------------------------------------- pre-emption and deadline

def test_sigusr1_stops_after_the_step_with_a_checkpoint_and_resume_is_bit_identical(tiny_store, tmp_path):
    overrides = ["optim.iters=12", "train.checkpoint_every=100", "train.num_workers=1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the subprocesses (OMP_NUM_THREADS=1): the same arithmetic, bit for bit
    try:
        train(tiny_config(*overrides), tiny_store, tmp_path / "reference")
    finally:
        torch.set_num_threads(threads)

    run_dir = tmp_path / "preempted"
    process = start(cli(tiny_store, run_dir, *overrides), run_dir, min_steps=2)
    before = steps_logged(run_dir)
    os.killpg(process.pid, signal.SIGUSR1)   # like SLURM's --signal: to the trainer and its DataLoader worker
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == STOPPED_EXIT_STATUS, stderr[-2000:]
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1 and "SIGUSR1" in stopped[0] and "--resume" in stopped[0], stderr[-2000:]
    assert "Traceback" not in stderr
    at = final_state(run_dir)["next_step"]
    assert before <= at <= before + 2 and at < 12                 # the step in flight finished, no more
    assert steps_logged(run_dir) == at and f"step-{at:08d}.pt" in stopped[0]

    resumed = subprocess.run(cli(tiny_store, run_dir, *overrides, resume=True), capture_output=True,
                             encoding="utf-8", errors="replace", env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = final_state(tmp_path / "reference"), final_state(run_dir)
    assert a["next_step"] == b["next_step"] == 12
    assert_states_identical(a, b)


def torchrun(store, run_dir, *overrides, resume=False):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return command + cli(store, run_dir, *overrides, resume=resume)[1:]


def test_sigterm_to_torchrun_stops_both_ranks_after_one_step_and_resume_is_bit_identical(tiny_store, tmp_path):
    overrides = ["optim.iters=10", "train.checkpoint_every=100"]
    reference = subprocess.run(torchrun(tiny_store, tmp_path / "reference", *overrides), capture_output=True,
                               encoding="utf-8", errors="replace", env=ENV, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "preempted"
    process = start(torchrun(tiny_store, run_dir, *overrides), run_dir, min_steps=2)
    before = steps_logged(run_dir)
    process.send_signal(signal.SIGTERM)   # torchrun forwards it to both ranks
    _, stderr = process.communicate(timeout=120)
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1 and "--resume" in stopped[0], stderr[-3000:]   # one line, from rank 0
    at = final_state(run_dir)["next_step"]
    assert before <= at <= before + 2 and at < 10 and steps_logged(run_dir) == at

    resumed = subprocess.run(torchrun(tiny_store, run_dir, *overrides, resume=True), capture_output=True,
                             encoding="utf-8", errors="replace", env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final_state(tmp_path / "reference"), final_state(run_dir)
    assert a["next_step"] == b["next_step"] == 10
    assert_states_identical(a, b)


def test_max_hours_stops_with_a_checkpoint(tiny_store, tmp_path, capsys):
    run_dir = tmp_path / "run"
    status = train_dino(["--config", str(CONFIG), "--data", str(tiny_store), "--out", str(run_dir), *TINY,
                         "optim.iters=400", "train.checkpoint_every=1000", "train.max_hours=0.0003"])
    err = capsys.readouterr().err
    assert status == STOPPED_EXIT_STATUS, err
    at = final_state(run_dir)["next_step"]
    assert 0 < at < 400 and steps_logged(run_dir) == at
    assert error_lines(err, "stopped by train.max_hours=0.0003") and f"step-{at:08d}.pt" in err and "--resume" in err


# ---------------------------------------------------------------- damaged checkpoint on --resume

@pytest.fixture(scope="module")
def short_run(tiny_store, tmp_path_factory):
    """A 4-step run with checkpoints after steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    train(tiny_config("optim.iters=4", "train.checkpoint_every=2"), tiny_store, run_dir)
    return run_dir


def test_damaged_checkpoint_on_resume_is_named_and_the_intact_one_offered(tiny_store, short_run, tmp_path,
                                                                          capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(short_run, run_dir)
    damaged = run_dir / "checkpoints" / "step-00000004.pt"
    with open(damaged, "r+b") as file:
        file.truncate(damaged.stat().st_size // 2)
    arguments = ["--config", str(CONFIG), "--data", str(tiny_store), "--out", str(run_dir), *TINY, "optim.iters=6",
                 "--resume"]
    assert train_dino(arguments) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {damaged}: not a braindino checkpoint"), lines
    assert str(run_dir / "checkpoints" / "step-00000002.pt") in lines[0] and "--resume" in lines[0]
    damaged.rename(damaged.with_name(damaged.name + ".damaged"))   # what the line says to do
    assert train_dino(arguments) == 0
    assert final_state(run_dir)["next_step"] == 6


# ---------------------------------------------------------------- full disk

def test_full_disk_while_writing_a_checkpoint(tiny_store, tmp_path, capsys, monkeypatch):
    real_save, saves = torch.save, []

    def save_on_a_filling_disk(obj, file, *args, **kwargs):   # the second checkpoint hits a full disk mid-write
        saves.append(file)
        return real_save(obj, file if len(saves) < 2 else FullAfter(file, 100_000), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_filling_disk)
    run_dir = tmp_path / "run"
    arguments = ["--config", str(CONFIG), "--data", str(tiny_store), "--out", str(run_dir), *TINY, "optim.iters=4",
                 "train.checkpoint_every=2"]
    assert train_dino(arguments) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {run_dir / 'checkpoints'}: no space left on device while writing "
                               f"step-00000004.pt (needs about ")
    assert "free)" in lines[0] and "step-00000002.pt, which is intact" in lines[0]
    assert no_temporary_files(run_dir) == [] and ckpt.latest_checkpoint(run_dir).name == "step-00000002.pt"
    monkeypatch.undo()   # space freed: the run continues from the intact checkpoint
    assert train_dino(arguments + ["--resume"]) == 0 and final_state(run_dir)["next_step"] == 4


def fail_second_safetensors_write(monkeypatch, module: str, room: int):
    """Let the first safetensors file of ``module`` be written; the next one fills the disk after ``room`` bytes."""
    import importlib

    from safetensors import SafetensorError

    target = importlib.import_module(module)
    real, calls = target.save_file, []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) < 2:
            return real(tensors, filename, *args, **kwargs)
        with open(filename, "wb") as file:
            file.write(b"\0" * room)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(target, "save_file", save_file)


def test_full_disk_during_export_keeps_the_earlier_export(short_run, tmp_path, capsys, monkeypatch):
    from braindino.encoder import load_encoder

    out = tmp_path / "model"
    assert braindino(["export", "--checkpoint", str(short_run), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    fail_second_safetensors_write(monkeypatch, "safetensors.torch", 10_000)   # weights fit, the heads do not
    assert braindino(["export", "--checkpoint", str(short_run), "--out", str(out), "--with-heads",
                      "--network", "student"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: no space left on device while writing the model "
                                                   f"folder (needs about "), lines
    assert "unchanged" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # the earlier export, whole
    assert no_temporary_files(tmp_path) == [] and load_encoder(out) is not None


def test_full_disk_during_extract_leaves_whole_feature_files_only(tiny_store, tmp_path, capsys, monkeypatch):
    from braindino.extract.features import read_volume_features

    model = write_tiny_model(tmp_path / "model", SliceStore(tiny_store).preprocessing)
    manifest, out = tiny_store.parent / "manifest.csv", tmp_path / "features"
    fail_second_safetensors_write(monkeypatch, "safetensors.numpy", 5_000)
    arguments = ["extract", "--model", str(model), "--manifest", str(manifest), "--out", str(out), "--workers", "0"]
    assert braindino(arguments) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {out / 'volumes'}: no space left on device while "
                                                   f"writing "), lines
    assert "needs about" in lines[0] and "kept" in lines[0]
    assert no_temporary_files(out) == []
    written = list((out / "volumes").iterdir())
    assert len(written) == 1 and read_volume_features(written[0])["cls"].shape[0] > 0
    monkeypatch.undo()
    assert braindino(arguments) == 0
    assert "7 computed" in capsys.readouterr().out   # the whole file written before is reused


@pytest.fixture(params=["tmpfs", "injected"])
def small_disk(request, tmp_path, monkeypatch):
    """A folder whose disk fills up after ~200 KiB: a size-limited tmpfs when this machine lets the test mount one
    (else, and for "injected", shard writes fail with ENOSPC once that much was written). Yields ``grow()``."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = request.param == "tmpfs" and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if mounted:
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(folder)], capture_output=True))
        yield folder, lambda: subprocess.run(["mount", "-o", "remount,size=4m", str(folder)], check=True)
        return
    from braindino.store import format as store_format

    real_append, room = store_format._ShardFile.append, {"left": 200 * 1024}

    def append_on_a_small_disk(self, slices):
        size = slices.astype(np.float16).nbytes
        if size > room["left"]:
            self._file.write(np.ascontiguousarray(slices, np.float16).tobytes()[:room["left"]])
            room["left"] = 0
            raise FULL_DISK
        room["left"] -= size
        return real_append(self, slices)

    monkeypatch.setattr(store_format._ShardFile, "append", append_on_a_small_disk)
    yield folder, lambda: room.update(left=1 << 40)


def test_full_disk_during_prepare_keeps_a_whole_store(tiny_store, small_disk, capsys):
    folder, grow = small_disk
    store = folder / "store"
    arguments = ["prepare", "--manifest", str(tiny_store.parent / "manifest.csv"), "--out", str(store), "--size",
                 "32", "--workers", "1", "--shard-mb", "0.03"]
    assert braindino(arguments) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {store}: no space left on device while "
                                                   f"writing the slice store (needs about "), lines
    assert no_temporary_files(folder) == []
    partial = SliceStore(store)
    assert 0 < len(partial.volumes) < 8 and f"{len(partial.volumes)} volumes committed before are kept" in lines[0]
    assert all(np.isfinite(partial[i]).all() for i in range(len(partial)))   # every committed volume is whole
    grow()
    assert braindino(arguments) == 0
    assert len(SliceStore(store).volumes) == 8


# ---------------------------------------------------------------- damaged store, worker errors

def test_shard_truncated_while_a_run_reads_it_stops_the_run_naming_the_file(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    run_dir = tmp_path / "run"
    process = start(cli(store, run_dir, "optim.iters=400", "train.checkpoint_every=1000", "train.num_workers=1"),
                    run_dir, min_steps=2)
    shard = next((store / "shards").glob("shard-*.f16"))
    with open(shard, "r+b") as file:
        file.truncate(shard.stat().st_size // 3)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-2000:]
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {shard}: ") and "DataLoader" not in stderr, stderr[-2000:]
    assert "prepare it again" in lines[0]
    losses = [json.loads(line).get("loss/total") for line in (run_dir / "metrics.jsonl").read_text(
        encoding="utf-8").splitlines()]
    assert 2 <= len(losses) < 400 and all(np.isfinite(v) for v in losses if v is not None)


def test_files_overwritten_or_truncated_under_an_open_store_are_named(tiny_store, tmp_path):
    store_dir = tmp_path / "store"
    shutil.copytree(tiny_store, store_dir)
    store = SliceStore(store_dir)
    store[0]
    shard = next((store_dir / "shards").glob("shard-*.f16"))
    size = shard.stat().st_size
    with open(shard, "r+b") as file:   # same size, new content: garbage (NaN) in place of slices
        file.write(np.full(size // 2, np.nan, np.float16).tobytes())
    with pytest.raises(InputError) as err:
        store[1]
    assert str(err.value).startswith(f"{shard}: file was truncated or overwritten while this run was reading it")
    shutil.copytree(tiny_store, tmp_path / "second")
    fresh = SliceStore(tmp_path / "second")
    fresh[0]
    table = next((tmp_path / "second").glob("index-*")) / "slices.npy"
    with open(table, "r+b") as file:
        file.truncate(100)
    with pytest.raises(InputError) as err:
        fresh[len(fresh) - 1]
    assert str(err.value).startswith(f"{table}: ") and "prepare it again" in str(err.value)
    shutil.copytree(tiny_store, tmp_path / "third")   # damaged before it was opened: NaN in a slice
    shard = next((tmp_path / "third" / "shards").glob("shard-*.f16"))
    with open(shard, "r+b") as file:
        file.write(np.full(4, np.nan, np.float16).tobytes())
    with pytest.raises(InputError, match="slice at row 0 holds NaN/Inf values"):
        SliceStore(tmp_path / "third")[0]


def test_worker_errors_reach_any_command_as_their_own_line(tiny_store, capsys, monkeypatch):
    from braindino.cli import train as command

    class Damaged(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise InputError("/data/shard-00003.f16", "shard has 10 bytes, store.json promises 20", "prepare again")

    def run(args):   # any command that reads through DataLoader workers
        return len(list(torch.utils.data.DataLoader(Damaged(), batch_size=None, num_workers=1)))

    monkeypatch.setattr(command, "run", run)
    assert braindino(["train", "--config", "x", "--data", "y", "--out", "z"]) == 1
    assert capsys.readouterr().err == ("error: /data/shard-00003.f16: shard has 10 bytes, store.json promises 20 — "
                                       "prepare again\n")
