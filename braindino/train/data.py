"""Which slices each process reads at each step: a pure function of (seed, step), so resuming needs no state.

The global batch is one slice of a seeded permutation of the whole store (a new permutation every pass);
process ``r`` of ``W`` takes the ``r``-th contiguous part of it. The same step therefore covers the same images at
any world size, and a run resumed on a different number of processes continues with the same data order.
The step's iBOT masks are drawn here too, in the loader's worker processes, off the training step's critical path.
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch

from braindino.augment import IBOTMaskSampler, MaskBatch
from braindino.store import SliceStore


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for everything random in one step of one process."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint64)[0] >> 1)


def ibot_mask_sampler(config) -> IBOTMaskSampler | None:
    """The config's iBOT mask recipe for the global crops, or None when the objective uses no masks."""
    if config.objective != "dino" or config.ibot.loss_weight <= 0:
        return None
    grid = (config.crops.global_size // config.model.patch_size,) * 2
    return IBOTMaskSampler(grid, tuple(config.ibot.mask_ratio_range), float(config.ibot.mask_sample_probability))


@dataclass
class StepBatch:
    """What one process trains on at one step: ``slices [B_local, 1, H, W]`` float16 and the iBOT masks of its
    ``2 * B_local`` global crops (None without iBOT)."""

    slices: torch.Tensor
    masks: MaskBatch | None

    def pin_memory(self) -> "StepBatch":
        return StepBatch(self.slices.pin_memory(), None if self.masks is None else self.masks.pin_memory())


def step_masks(sampler: IBOTMaskSampler | None, n_images: int, seed: int, step: int, rank: int) -> MaskBatch | None:
    """The masks of ``step`` on ``rank``: drawn from ``step_seed``, so they are the same wherever they are made."""
    if sampler is None:
        return None
    return sampler(n_images, np.random.default_rng(step_seed(seed, step, rank)))


@functools.lru_cache(maxsize=2)
def pass_permutation(seed: int, pass_index: int, n_slices: int) -> np.ndarray:
    """``[n_slices]`` the order of pass ``pass_index`` over the store (cached: computed once per pass per process)."""
    return np.random.default_rng([seed, pass_index]).permutation(n_slices)


def global_batch_indices(step: int, global_batch_size: int, n_slices: int, seed: int) -> np.ndarray:
    """``[global_batch_size]`` int64 slice indices for ``step``; passes over the data wrap into a new permutation."""
    start = step * global_batch_size
    positions = np.arange(start, start + global_batch_size)
    passes, offsets = np.divmod(positions, n_slices)
    indices = np.empty(global_batch_size, dtype=np.int64)
    for pass_index in np.unique(passes):
        permutation = pass_permutation(seed, int(pass_index), n_slices)
        chosen = passes == pass_index
        indices[chosen] = permutation[offsets[chosen]]
    return indices


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``step`` is this process's ``StepBatch`` of that step.

    ``slices`` are this process's part of the step's global batch, ``B_local = global_batch_size // world_size``.
    Use with ``DataLoader(batch_size=None, sampler=range(start_step, iters))``; worker processes open the store
    lazily, so nothing large is pickled.
    """

    def __init__(self, store: SliceStore, global_batch_size: int, rank: int, world_size: int, seed: int,
                 mask_sampler: IBOTMaskSampler | None = None):
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by {world_size} processes")
        self.store = store
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.mask_sampler = mask_sampler

    def __len__(self) -> int:
        return 2 ** 62

    def __getitem__(self, step: int) -> StepBatch:
        indices = global_batch_indices(step, self.global_batch_size, len(self.store), self.seed)
        mine = indices[self.rank * self.local_batch_size:(self.rank + 1) * self.local_batch_size]
        slices = torch.from_numpy(self.store.read_slices(mine)).unsqueeze(1)
        masks = step_masks(self.mask_sampler, 2 * self.local_batch_size, self.seed, step, self.rank)
        return StepBatch(slices, masks)


def batches_checked_against(loader: torch.utils.data.DataLoader, store: SliceStore):
    """The loader's batches; when a worker process dies (a shard truncated while a worker copied a batch out of its
    memory map raises SIGBUS there), the store file that changed is named (``SliceStore.check_files``) in place
    of torch's "worker exited unexpectedly"."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError:
            store.check_files()
            raise
        yield batch


def step_loader(store: SliceStore, config, rank: int, world_size: int, start_step: int) -> torch.utils.data.DataLoader:
    """An iterator of ``StepBatch`` for steps ``start_step .. iters-1`` (prefetched by worker processes, pinned
    when a GPU will take them)."""
    dataset = StepBatches(store, int(config.optim.global_batch_size), rank, world_size, int(config.seed),
                          ibot_mask_sampler(config))
    workers = int(config.train.num_workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start_step, int(config.optim.iters)), num_workers=workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None)
