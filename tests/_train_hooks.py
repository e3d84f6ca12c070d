"""Test hooks around a real training run: record which store slices a process read for training, and make chosen
calls of the DINO objective return a NaN loss (with finite gradients) on chosen ranks.

In-process: ``with hooks(reads_file, nan_calls): train(...)``. Under torchrun, as the script torchrun starts::

    torchrun --nproc_per_node=2 tests/_train_hooks.py READS_DIR NAN_RANKS NAN_CALLS [train_dino.py arguments...]

writes ``READS_DIR/reads-rank{R}.json`` (the slice indices rank R read, in order) and makes the objective's loss NaN on
the ranks in NAN_RANKS (comma-separated, "" for none) at its calls NAN_CALLS (0-based, counted per process).
Only public entry points are wrapped: ``SliceStore.read_slices`` (reads made by the online kNN monitor are not
counted) and ``DINOObjective.forward``.
"""

import contextlib
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

# The intensity augmentation cannot be switched off through the config (``intensity`` is an empty struct node, so
# ``intensity.p_gamma=0`` is refused); tests that need views independent of the rank call this before load_config.
NO_INTENSITY = "BRAINDINO_TEST_NO_INTENSITY"


def intensity_off_defaults() -> dict:
    from braindino.augment import IntensityAugmentConfig

    return {f.name: 0.0 for f in fields(IntensityAugmentConfig) if f.name.startswith("p_")}


@contextlib.contextmanager
def hooks(reads_file=None, nan_calls=(), no_intensity=False):
    import torch

    from braindino.store import SliceStore
    from braindino.train import config as config_module
    from braindino.train.dino import DINOObjective
    from braindino.train.online_knn import OnlineKNN

    reads, in_knn, calls = [], [False], [0]
    original_read, original_forward = SliceStore.read_slices, DINOObjective.forward
    original_accuracy, original_intensity = OnlineKNN.accuracy, config_module.DEFAULTS["intensity"]

    def recording_read(self, indices):
        if not in_knn[0]:
            reads.extend(int(i) for i in indices)
        return original_read(self, indices)

    def knn_accuracy(self, *args, **kwargs):
        in_knn[0] = True
        try:
            return original_accuracy(self, *args, **kwargs)
        finally:
            in_knn[0] = False

    def nan_forward(self, *args, **kwargs):
        total, terms, extra = original_forward(self, *args, **kwargs)
        call, calls[0] = calls[0], calls[0] + 1
        # a NaN added as a constant: the loss is NaN but its gradients stay finite, so only the loss check (and,
        # under torchrun, every rank agreeing on it) can stop the update; DDP would spread NaN gradients by itself
        return (total + torch.tensor(float("nan")) if call in nan_calls else total), terms, extra

    SliceStore.read_slices, DINOObjective.forward, OnlineKNN.accuracy = recording_read, nan_forward, knn_accuracy
    if no_intensity:
        config_module.DEFAULTS["intensity"] = intensity_off_defaults()
    try:
        yield reads
    finally:
        SliceStore.read_slices, DINOObjective.forward = original_read, original_forward
        OnlineKNN.accuracy, config_module.DEFAULTS["intensity"] = original_accuracy, original_intensity
        if reads_file is not None:
            Path(reads_file).write_text(json.dumps(reads), encoding="utf-8")


def main() -> int:
    reads_dir, nan_ranks, nan_calls, *arguments = sys.argv[1:]
    rank = int(os.environ.get("RANK", "0"))
    calls = {int(c) for c in nan_calls.split(",") if c} if str(rank) in nan_ranks.split(",") else set()
    from braindino.cli.train import main as train_main

    with hooks(Path(reads_dir) / f"reads-rank{rank}.json", calls, no_intensity=bool(os.environ.get(NO_INTENSITY))):
        return train_main(arguments)


if __name__ == "__main__":
    sys.exit(main())
