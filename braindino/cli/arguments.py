"""Argument types and the argument groups the commands share, so a flag means the same thing, has the same
default and is validated the same way in every command that takes it.

Groups: :func:`add_encoder_arguments` (``--model``, ``--baseline``, ``--no-default-baselines``, ``--device``),
:func:`add_endpoint_arguments` (``--task``, ``--target``, ``--time``, ``--event``, ``--sequences``, ``--fusion``,
``--pooling``, ``--head``, ``--unit``), :func:`add_protocol_arguments` (``--seeds``, ``--folds``, ``--protocol``,
``--bootstrap``) and :func:`add_extraction_arguments` (``--workers``, ``--batch-size``, ``--slice-stride``).
Every list flag is comma-separated (:func:`comma_list`); every ``--out`` must be a folder that can be written
(:func:`check_writable_folder`, checked before any work).
"""

from __future__ import annotations

import argparse
import os

from braindino.probe.endpoints import FUSIONS, HEADS, POOLINGS, UNITS

DEFAULT_WORKERS = min(4, len(os.sched_getaffinity(0)))
PROTOCOLS = ("auto", "split", "cv")


def positive_int(text: str) -> int:
    """argparse ``type`` for counts that must be at least 1 (subjects, batch size, slice stride)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse ``type`` for counts that may be 0 (worker processes: 0 reads in the main process)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def comma_list(kind=str):
    """argparse ``type``: ``"a,b,c"`` → ``[kind("a"), kind("b"), kind("c")]`` (blank items dropped; ``""`` → [])."""
    def parse(text: str) -> list:
        try:
            return [kind(item.strip()) for item in str(text).split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {kind.__name__} values: {text!r} "
                                             f"(write e.g. 1,10,100)") from None
    parse.__name__ = f"comma-separated {kind.__name__} list"
    return parse


def check_writable_folder(text: str) -> None:
    """Raise InputError unless ``text`` is a folder that exists or can be created, and that this user can write
    (every command checks its ``--out`` before any work)."""
    from braindino.errors import InputError

    parent = os.path.abspath(text)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(text, f"--out cannot be a folder here: {parent} is a file", "choose another --out folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(text, f"--out cannot be written: no permission to write into {parent}",
                         "choose another --out folder")


def add_out(parser: argparse.ArgumentParser, metavar: str, help: str, required: bool = True, default=None) -> None:
    parser.add_argument("--out", required=required, default=default, metavar=metavar, help=help)


def add_encoder_arguments(parser: argparse.ArgumentParser, several_models: bool = False,
                          baselines: bool = True, scratch: bool = False) -> None:
    """``--model`` (repeatable with ``several_models``: the first is the model under test), ``--baseline`` and
    ``--no-default-baselines`` (with ``baselines``; ``scratch``: the help names the probe's ``scratch``),
    ``--device``."""
    specs = "a braindino model folder (braindino export), random:<arch>[:seed], pixels[:grid] or a timm local-dir ViT"
    if several_models:
        parser.add_argument("--model", action="append", required=True, metavar="MODEL",
                            help=f"encoder to compare: {specs}; repeatable, the first is the model under test")
    else:
        parser.add_argument("--model", required=True, metavar="MODEL", help=f"encoder: {specs}")
    if baselines:
        parser.add_argument("--baseline", action="append", default=[], metavar="SPEC",
                            help="extra baseline encoder (same specs as --model; random:/pixels copy the model's "
                                 "preprocessing)" + ("; scratch: a small CNN trained from random init on each "
                                                     "training set's labels (see --epochs)" if scratch else "")
                                 + "; repeatable")
        parser.add_argument("--no-default-baselines", action="store_true",
                            help="do not add the default baselines random_like (random init of the model's "
                                 "architecture) and pixels (the non-deep pixel baseline)")
    parser.add_argument("--device", default=None, help="encoder device: cuda, mps or cpu (default: the best "
                                                       "available)")


def add_endpoint_arguments(parser: argparse.ArgumentParser, tasks, task_required: bool = False,
                           poolings=POOLINGS, pooling: str = "mean", heads=HEADS, fusion: bool = True,
                           unit: bool = True) -> None:
    """The endpoint: task, its label columns, the sequences read per subject and how slices and sequences are
    pooled; ``poolings`` / ``heads`` the choices this command supports, ``pooling`` its default."""
    parser.add_argument("--task", choices=tasks, required=task_required, help="what the endpoint is")
    parser.add_argument("--target", metavar="COL", help="label column (classification / regression)")
    parser.add_argument("--time", metavar="COL", help="survival: time-to-event column (> 0)")
    parser.add_argument("--event", metavar="COL", help="survival: event column (1 event, 0 censored)")
    parser.add_argument("--sequences", "--sequence", dest="sequences", type=comma_list(), metavar="LIST",
                        help="comma-separated sequences read per subject, e.g. T1c,FLAIR (default: every sequence "
                             "in the manifest)")
    if fusion:
        parser.add_argument("--fusion", choices=FUSIONS, default="concat",
                            help="how a subject's sequences are fused: concat or mean of pooled vectors "
                                 "(default concat)")
    parser.add_argument("--pooling", choices=poolings, default=pooling,
                        help=f"slice pooling (default {pooling}): mean, max or meanmax of each slice's CLS ‖ mean "
                             "patch token; hemispheres: mean and max over slices of (left - right) ‖ (left + "
                             "right)/2 of the mean patch tokens of the patient's left and right half of the slice; "
                             "mil: an attention-MIL head over the slices")
    parser.add_argument("--head", choices=heads, default="linear",
                        help="head on pooled features: linear (default), mlp, or knn (DINO's weighted kNN)")
    if unit:
        parser.add_argument("--unit", choices=UNITS, default="auto",
                            help="sample unit: subject (its sequences fused, one label per subject) or volume "
                                 "(each manifest row a sample; folds and bootstrap still group by subject); auto: "
                                 "volume when the target is 'sequence' or differs within a subject")


def add_protocol_arguments(parser: argparse.ArgumentParser, seeds: str = "0,1,2", bootstrap: int = 1000) -> None:
    """Seeds, folds, the split-or-CV protocol and the bootstrap."""
    parser.add_argument("--seeds", type=comma_list(int), default=comma_list(int)(seeds), metavar="LIST",
                        help=f"head seeds, comma-separated (default {seeds})")
    parser.add_argument("--folds", type=int, default=5, help="CV folds when there is no split column (default 5)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="auto",
                        help="split: train on the manifest's train+val rows, test on its test rows; cv: subject-"
                             "grouped k-fold over every labelled subject (ignores the split column); auto (default): "
                             "split when every subject has one, else cv")
    parser.add_argument("--bootstrap", type=positive_int, default=bootstrap, metavar="N",
                        help=f"bootstrap resamples of subjects for CIs and paired tests (default {bootstrap})")


def add_workers(parser: argparse.ArgumentParser, auto: bool = False) -> None:
    """``--workers``; with ``auto`` its default is None: the extraction readers' own choice (on a CPU encoder only the
    cores torch's threads leave free, see ``braindino.extract.cohort.auto_reader_workers``)."""
    if auto:
        parser.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                            help="reader processes (default: up to 4 with a GPU encoder; with a CPU encoder only the "
                                 "cores torch's threads leave free, often 0; 0: read in this process)")
        return
    parser.add_argument("--workers", type=non_negative_int, default=DEFAULT_WORKERS, metavar="N",
                        help=f"worker processes (default {DEFAULT_WORKERS}: up to 4 cores; 0: in this process)")


def add_extraction_arguments(parser: argparse.ArgumentParser, batch_size: int = 64,
                             auto_workers: bool = False) -> None:
    """Worker processes, slices per encoder batch and the slice stride."""
    add_workers(parser, auto=auto_workers)
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="N",
                        help=f"slices per encoder batch (default {batch_size})")
    parser.add_argument("--slice-stride", type=positive_int, default=1, metavar="K",
                        help="embed every K-th kept axial slice only: K times less extraction (default 1; "
                             "segmentation needs 1)")


def add_model_features(parser: argparse.ArgumentParser, default: str) -> None:
    """``--features``: the one features folder of ``--model`` (volumes already there with the same settings are
    reused, the others added)."""
    parser.add_argument("--features", metavar="FEATURES", help="features folder of --model (braindino extract, or "
                        f"a probe run's RUN/features/<model>): volumes already there are reused (default: {default})")
