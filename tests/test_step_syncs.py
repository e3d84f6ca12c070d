"""The training step never reads a value back from the device between log steps (issue: GPU-speed step).

On the CPU a host–device sync cannot be observed directly, so every call that *would* be one on a GPU is counted
with a ``TorchFunctionMode``: ``.item()``, ``.tolist()``, ``bool`` / ``float`` / ``int`` of a tensor, ``nonzero``,
boolean-mask indexing, ``masked_select``, ``unique``, copies to NumPy. The augmentations take their GPU code path
here (``GATHER_ON_CPU`` off: on a real CPU run they gather the selected rows, which costs no sync there). On CUDA
the same steps run under ``torch.cuda.set_sync_debug_mode("error")``.
"""

import shutil

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from braindino.augment import MaskBatch, sample_batch_masks, sampling
from braindino.store import SliceStore
from braindino.train.config import load_config
from braindino.train.data import StepBatch, StepBatches, ibot_mask_sampler, step_masks, step_seed
from braindino.train.distributed import DistInfo
from braindino.train.step import TrainingStep, build_training

TINY = ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.drop_path_rate=0.1",
        "crops.global_size=32", "crops.local_size=16", "crops.n_local=2", "dino.n_prototypes=32",
        "ibot.n_prototypes=32", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
        "optim.global_batch_size=4", "optim.warmup_iters=1", "dino.freeze_last_layer_iters=1",
        "train.num_workers=0", "train.precision=fp32"]
# every intensity augmentation on at p = 0.5, so each selection path runs with some rows chosen and some not
ALL_AUGMENTATIONS = [f"intensity.{name}=0.5" for name in ("p_gamma", "p_contrast", "p_bias_field", "p_gibbs",
                                                          "p_spike", "p_ghosting", "p_noise", "p_blur")]
SYNC_METHODS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "argwhere",
                "masked_select", "unique", "numpy", "_local_scalar_dense"}


@pytest.fixture(autouse=True)
def gpu_code_path(monkeypatch):
    monkeypatch.setattr(sampling, "GATHER_ON_CPU", False)


class HostSyncCounter(TorchFunctionMode):
    """Counts the calls that make a GPU wait for the host; ``calls`` lists them by name."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in SYNC_METHODS:
            self.calls.append(name)
        elif name in ("__getitem__", "__setitem__") and _has_bool_index(args[1] if len(args) > 1 else None):
            self.calls.append(f"{name}[bool mask]")
        elif name == "repeat_interleave" and isinstance(args[1] if len(args) > 1 else None, torch.Tensor):
            self.calls.append("repeat_interleave(tensor repeats)")
        return func(*args, **kwargs)


def _has_bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


def _training_step(objective: str, device: torch.device, *overrides):
    config = load_config(None, TINY + [f"objective={objective}", *ALL_AUGMENTATIONS, *overrides])
    info = DistInfo(0, 1, 0, device)
    return config, TrainingStep(config, build_training(config, info), info)


def _loader_batches(config, steps):
    """The batches the data loader would deliver (masks drawn the loader's way), on random slices."""
    sampler = ibot_mask_sampler(config)
    batches = []
    for step in steps:
        slices = torch.rand((4, 1, 40, 40), generator=torch.Generator().manual_seed(step)).half()
        batches.append(StepBatch(slices, step_masks(sampler, 8, config.seed, step, 0)))
    return batches


@pytest.mark.parametrize("objective", ["dino", "simclr"])
def test_training_steps_make_no_host_sync(objective):
    config, run_step = _training_step(objective, torch.device("cpu"))
    batches = _loader_batches(config, range(3))
    run_step(0, batches[0])                         # first step: lazy initialisation may read shapes once
    counter = HostSyncCounter()
    with counter:
        results = [run_step(step, batch) for step, batch in zip((1, 2), batches[1:])]
    assert counter.calls == []
    # what the step produced is still there to read on a log step (outside the counted region)
    assert all(result.applied and np.isfinite(result.losses["total"]) for result in results)
    if objective == "dino":
        assert set(results[-1].losses) == {"dino", "ibot", "koleo", "total"}


def test_the_counter_sees_the_syncs_it_guards_against():
    """The counter itself can fail: each kind of sync it must catch is caught."""
    values = torch.arange(6.0)
    counter = HostSyncCounter()
    with counter:
        float(values.sum())
        values.max().item()
        values[values > 2]
        values.nonzero()
        bool(values.any())
    assert counter.calls == ["__float__", "item", "__getitem__[bool mask]", "nonzero", "__bool__"]


def test_a_non_finite_step_is_skipped_on_the_device_and_read_back_later():
    config, run_step = _training_step("dino", torch.device("cpu"), "dino.teacher_target=centering")
    batch = _loader_batches(config, [0])[0]
    for step in (0, 1):                              # lr > 0 from step 1: student, teacher and centres move apart
        run_step(step, batch)
    training = run_step.training
    before = {name: value.detach().clone() for name, value in training.student_module.state_dict().items()}
    teacher_before = {name: value.detach().clone() for name, value in training.teacher.state_dict().items()}
    centres_before = {name: value.clone() for name, value in training.objective.state_dict().items()}
    optimiser_before = {id(p): {k: v.clone() for k, v in state.items()} for p, state in training.optimizer.state.items()}
    poisoned = StepBatch(torch.full_like(batch.slices, float("nan")), batch.masks)
    counter = HostSyncCounter()
    with counter:
        result = run_step(2, poisoned)
    assert counter.calls == []
    assert not result.applied and result.skipped_flag.item() == 1.0
    for name, value in training.student_module.state_dict().items():
        assert torch.equal(value, before[name]), f"student {name} changed on a skipped step"
    for name, value in training.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), f"teacher {name} changed on a skipped step"
    for name, value in training.objective.state_dict().items():
        assert torch.equal(value, centres_before[name]), f"objective {name} changed on a skipped step"
    for parameter, state in training.optimizer.state.items():
        # a parameter first seen on this step (the last layer, frozen until now) gets Adam's initial state:
        # step 0 and zero moments, exactly what a later first update would create
        expected = optimiser_before.get(id(parameter), {key: torch.zeros_like(value) for key, value in state.items()})
        for key, value in state.items():
            assert torch.equal(value, expected[key]), f"optimizer {key} changed"
    assert run_step(3, batch).applied                # and training goes on from the untouched state


def test_loader_masks_equal_the_masks_the_step_would_draw(tiny_store):
    """Masks made in a loader worker are the ones an in-process step draws: resume and bit-identity hold."""
    config = load_config(None, TINY + ["ibot.mask_sample_probability=1.0"])
    dataset = StepBatches(SliceStore(tiny_store), 4, 0, 1, int(config.seed), ibot_mask_sampler(config))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(5, 7), num_workers=1)
    for step, batch in zip(range(5, 7), loader):
        # the contract: a step's masks are those of sample_batch_masks seeded by step_seed(seed, step, rank)
        rng = np.random.default_rng(step_seed(config.seed, step, 0))
        expected = MaskBatch.from_masks(sample_batch_masks(8, (4, 4), tuple(config.ibot.mask_ratio_range),
                                                           1.0, rng).numpy())
        assert isinstance(batch.masks, MaskBatch) and batch.masks.masks.shape == (8, 16)
        for part in ("masks", "indices", "weights"):
            assert torch.equal(getattr(batch.masks, part), getattr(expected, part))
        assert torch.equal(batch.masks.indices, batch.masks.masks.flatten().nonzero().squeeze(1))
        assert batch.masks.weights.sum().item() == pytest.approx(1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_steps_raise_on_any_sync():
    config, run_step = _training_step("dino", torch.device("cuda"), "train.precision=bf16")
    batches = [StepBatch(b.slices.pin_memory(), b.masks.pin_memory()) for b in _loader_batches(config, range(3))]
    run_step(0, batches[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, batch in zip((1, 2), batches[1:]):
            run_step(step, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


COMPILE_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_step_syncs import _training_step
batch = torch.rand((4, 1, 40, 40), generator=torch.Generator().manual_seed(0))
results = {}
for compiled in (False, True):
    _, run_step = _training_step("dino", torch.device("cpu"), f"train.compile={str(compiled).lower()}")
    assert all((b._compiled_call_impl is not None) == compiled for b in run_step.training.student_module.backbone.vit.blocks)
    losses = [run_step(step, batch).losses["total"] for step in (0, 1)]
    results[compiled] = losses, run_step.training.student_module.state_dict()
loss_gap = max(abs(a - b) / abs(a) for a, b in zip(results[False][0], results[True][0]))
weight_gap = max((results[True][1][n] - v).abs().max().item() for n, v in results[False][1].items())
print(f"{loss_gap} {weight_gap}")
"""


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend needs a C compiler")
def test_compiled_blocks_train_like_eager_ones():
    """``train.compile=true`` compiles each transformer block; two steps agree with eager ones to float error.
    Run in a fresh interpreter: inductor's build step trips over modules other tests leave imported."""
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", COMPILE_CHECK, str(Path(__file__).parent)], capture_output=True,
                            text=True, encoding="utf-8", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loss_gap, weight_gap = (float(value) for value in result.stdout.split()[-2:])
    assert loss_gap < 1e-5 and weight_gap < 1e-5


def test_the_training_loop_reads_the_device_only_on_log_steps(tiny_store, tmp_path, monkeypatch):
    """A real ``train()`` run: host reads happen in the iterations of log steps (every 4th here), none between;
    and a step never starts while the previous step's network outputs are still alive (peak memory)."""
    import weakref

    import braindino.train.trainer as trainer

    counter, boundaries, previous_outputs = HostSyncCounter(), [], []
    real_step = trainer.TrainingStep.__call__

    def marked_step(self, step, batch):
        boundaries.append(len(counter.calls))
        assert all(output() is None for output in previous_outputs), f"step {step - 1}'s outputs still alive"
        result = real_step(self, step, batch)
        previous_outputs[:] = [weakref.ref(result.student_out["cls"]), weakref.ref(result.extra["teacher_probs"])]
        return result

    monkeypatch.setattr(trainer.TrainingStep, "__call__", marked_step)
    config = load_config(None, TINY + ["optim.iters=9", "train.log_every=4", "train.monitor_every=1000",
                                       "train.checkpoint_every=1000", "train.progress=false"])
    with counter:
        trainer.train(config, tiny_store, tmp_path / "run")
    boundaries.append(len(counter.calls))
    reads_per_iteration = [after - before for before, after in zip(boundaries[1:-1], boundaries[2:])]
    # iteration i runs step i + 1 (step 0 builds lazily and is left out); steps 3 and 7 log, step 8 is the last
    assert [i + 1 for i, n in enumerate(reads_per_iteration) if n] == [3, 7, 8]


def test_cpu_gather_and_gpu_where_paths_give_the_same_augmentation(monkeypatch):
    """The two ways ``apply_to_selected`` applies an op give the same images (ops whose draws do not depend on how
    many rows are computed; noise does, by design)."""
    from braindino.augment import random_bias_field, random_blur, random_gamma, random_gibbs, random_ghosting

    images = torch.rand((8, 1, 24, 24), generator=torch.Generator().manual_seed(0))
    ops = (random_gamma, random_bias_field, random_gibbs, random_ghosting, random_blur)
    outputs = {}
    for gather in (True, False):
        monkeypatch.setattr(sampling, "GATHER_ON_CPU", gather)
        outputs[gather] = [op(images, torch.Generator().manual_seed(1), 0.5) for op in ops]
    for op, gathered, chosen in zip(ops, outputs[True], outputs[False]):
        assert not torch.equal(gathered, images), op.__name__
        torch.testing.assert_close(gathered, chosen, rtol=0, atol=1e-6, msg=op.__name__)
