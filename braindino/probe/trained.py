"""The rows of a probe that learn end to end on each training set's labels: the supervised-from-scratch baseline
(``--baseline scratch``) and fine-tuning of the model (``--finetune last:K`` / ``--finetune lora:R``).

They cannot be a fixed feature table: every cell (setting, seed, fold) trains a fresh network on that fold's
labelled training subjects, on the same splits, fractions, shots and seeds as the frozen probes, and predicts its
test subjects; the statistics, tables and headline treat them like any other encoder row. One trainer serves both
(:class:`heads.slice_network.SliceNetworkHead`); the backbone differs: a narrow SFCN-like 2D CNN
(:mod:`heads.scratch`) or the model's ViT with its last K blocks or LoRA adapters trainable (:mod:`heads.finetune`).

Their input is the slices the encoder sees: each volume read and preprocessed by the ingest code with the model's
preprocessing (:func:`~braindino.ingest.worker.prepare_volume`), every ``slice_stride``-th kept slice, at most
``max_slices`` of them evenly spaced, resized (bilinear, antialiased, as :meth:`Encoder.embed_slices` does) to the
scratch CNN's size or the encoder's input size. A sample's volume embedding is its slices' embeddings pooled by the
endpoint's pooling (mean, max, meanmax; hemispheres and mil pool by the mean), its sequences fused by the
endpoint's fusion. Segmentation endpoints are not run for these rows.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from braindino.errors import InputError

SCRATCH = "scratch"
FINETUNE_HINT = "write --finetune last:K (the last K blocks) or --finetune lora:R (rank-R adapters), e.g. last:2"


@dataclass(frozen=True)
class TrainingOptions:
    """How the end-to-end rows train: ``epochs`` (at most; early stopping on held-out training subjects),
    ``max_slices`` per volume, ``scratch_size`` (px of the scratch CNN's slices), AdamW ``lr`` (the scratch CNN and
    every output layer) and ``finetune_lr`` (the pretrained blocks or adapters being fine-tuned), ``batch_size``
    (samples per step), ``patience`` (epochs), ``device``."""

    epochs: int = 30
    max_slices: int = 16
    scratch_size: int = 64
    lr: float = 3e-3
    finetune_lr: float = 3e-4
    batch_size: int = 4
    patience: int = 5
    device: str = "cpu"

    def check(self) -> TrainingOptions:
        if self.epochs < 1:
            raise InputError("--epochs", f"must be at least 1, got {self.epochs}", "pass e.g. --epochs 30")
        if self.max_slices < 1:
            raise InputError("--max-slices", f"must be at least 1, got {self.max_slices}", "pass e.g. --max-slices 16")
        if self.scratch_size < 16:
            raise InputError("--scratch-size", f"the scratch CNN's 4 pooling blocks need at least 16 px, got "
                                               f"{self.scratch_size}", "pass e.g. --scratch-size 64")
        return self


def parse_finetune(spec: str) -> tuple[str, int]:
    """``"last:K"`` → ("last", K); ``"lora:R"`` → ("lora", R); InputError otherwise."""
    mode, _, amount = str(spec).partition(":")
    if mode not in ("last", "lora") or not amount.isdigit() or int(amount) < 1:
        raise InputError("--finetune", f"unknown fine-tuning {spec!r}", FINETUNE_HINT)
    return mode, int(amount)


@dataclass(frozen=True)
class FinetuneBackbone:
    """Recipe of a :class:`heads.finetune.ViTSliceBackbone` over a fresh copy of ``model``'s ViT (a
    :func:`~braindino.load_encoder` spec, loaded once per process on the CPU); ``size``: the encoder's input size."""

    model: str
    mode: str
    amount: int
    size: int

    def __call__(self):
        from heads.finetune import ViTSliceBackbone

        with torch.random.fork_rng(devices=[]):      # loading (or not, when cached) leaves the caller's RNG alone
            backbone = copy.deepcopy(_cpu_encoder(self.model).backbone)
        return ViTSliceBackbone(backbone, self.mode, self.amount)


@functools.lru_cache(maxsize=2)
def _cpu_encoder(spec: str):
    from braindino import load_encoder

    return load_encoder(spec, device="cpu")


@dataclass(frozen=True)
class TrainedHeadFactory:
    """``factory(task, endpoint spec, seed)`` → an unfitted :class:`heads.slice_network.SliceNetworkHead` (picklable,
    so cells in worker processes build their own)."""

    backbone: object
    options: TrainingOptions
    backbone_lr: float | None = None

    def __call__(self, task: str, spec, seed: int):
        from heads.slice_network import SliceNetworkHead

        pooling = spec.pooling if spec.pooling in ("mean", "max", "meanmax") else "mean"
        o = self.options
        return SliceNetworkHead(task, self.backbone, pooling=pooling, fusion=spec.fusion, epochs=o.epochs, lr=o.lr,
                                backbone_lr=self.backbone_lr, batch_size=o.batch_size, patience=o.patience,
                                device=o.device, random_state=seed)


@dataclass
class TrainedEncoder:
    """One end-to-end row. ``role`` "baseline" (scratch) or "finetune"; ``parameters``: the backbone's parameters
    (scratch: the CNN; finetune: the ViT); ``frozen_parameters``: those never trained (the fraction trained is
    trained / (trained + frozen), trained counted per fit); ``size``: slice px; ``rows`` {manifest row: slices
    ``[S, size, size]`` float16} of the volumes read (set by :class:`SliceCollector`)."""

    name: str
    role: str
    spec: str
    fingerprint: str
    parameters: int
    frozen_parameters: int
    backbone: object
    backbone_lr: float | None
    size: int
    description: str
    options: TrainingOptions = TrainingOptions()
    slice_stride: int = 1
    rows: dict = field(default_factory=dict)
    features: object | None = None    # no features folder: EncoderInfo.features stays empty

    @property
    def slug(self) -> str:
        from braindino.probe.encoders import slug
        return slug(self.name)

    def release(self) -> None:
        """Nothing to free (the slices are needed until scoring)."""

    def factory(self) -> TrainedHeadFactory:
        return TrainedHeadFactory(self.backbone, self.options, self.backbone_lr)

    def note(self) -> str:
        """One endpoint note: what this row is."""
        return f"{self.name}: {self.description}"

    def inputs(self, table):
        """The :class:`heads.slice_network.SliceBags` of ``table``'s samples: per sample its volumes' slices, in the
        endpoint's sequence order (volume unit: the sample's own volume)."""
        from heads.slice_network import SliceBags

        per_volume = table.spec.unit == "volume"
        samples = []
        for sample_rows in table.rows:
            keys = list(sample_rows) if per_volume else table.sequences
            samples.append([self.rows[sample_rows[key]] for key in keys])
        return SliceBags(samples)


def training_note(entries: list[TrainedEncoder]) -> str:
    """One endpoint note: how the end-to-end rows ``entries`` (one run, shared options) were trained."""
    o, stride = entries[0].options, entries[0].slice_stride
    return (f"{', '.join(e.name for e in entries)}: trained end to end on each training set of every setting, seed "
            f"and fold, at most {o.epochs} epochs of mini-batches of {o.batch_size} samples; early stopping (patience "
            f"{o.patience}) on 20 % of the training subjects when there are at least 8, else every epoch on all of "
            f"them; slices: the kept slices at stride {stride}, at most {o.max_slices} per volume (evenly spaced), "
            "pooled by the endpoint's pooling (mean for hemispheres and mil), sequences fused by its fusion")


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trained_encoders(model_entry, scratch: bool, finetune, options: TrainingOptions, slice_stride: int
                     ) -> list[TrainedEncoder]:
    """The end-to-end rows of a run: ``scratch`` → the scratch CNN; each ``finetune`` spec → the model fine-tuned.
    ``model_entry``: the model's :class:`~braindino.probe.encoders.EncoderUnderTest` (encoder still loaded)."""
    from heads.finetune import ViTSliceBackbone
    from heads.scratch import ScratchCNN

    options.check()
    encoder = model_entry.encoder
    common = {"preprocessing": encoder.preprocessing.to_dict(), "slice_stride": slice_stride,
              "max_slices": options.max_slices, "epochs": options.epochs, "batch_size": options.batch_size,
              "patience": options.patience}
    rows = []
    if scratch:
        recipe = ScratchCNN(size=options.scratch_size)
        rows.append(TrainedEncoder(
            SCRATCH, "baseline", SCRATCH, _digest({"scratch": list(recipe.channels), "size": recipe.size,
                                                   "lr": options.lr, **common}),
            recipe.parameters(), 0, recipe, None, recipe.size,
            f"{recipe.describe()}, trained from random init on each training set", options, slice_stride))
    for spec in dict.fromkeys(finetune or ()):
        mode, amount = parse_finetune(spec)
        if getattr(encoder.backbone, "vit", None) is None:
            raise InputError("--finetune", f"{model_entry.name} is not a ViT", "fine-tune a ViT model, or leave out "
                                                                                "--finetune")
        depth = len(encoder.backbone.vit.blocks)
        if mode == "last" and amount > depth:
            raise InputError("--finetune", f"last:{amount} asks for more blocks than the model has ({depth})",
                             f"pass last:K with K <= {depth}")
        recipe = FinetuneBackbone(model_entry.spec, mode, amount, encoder.input_size)
        with torch.random.fork_rng(devices=[]):
            module = ViTSliceBackbone(copy.deepcopy(encoder.backbone).cpu(), mode, amount)
        total = sum(p.numel() for p in module.parameters())
        trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
        vit_total = sum(p.numel() for p in encoder.backbone.parameters())
        what = (f"the last {amount} of {depth} blocks and the final norm" if mode == "last"
                else f"rank-{amount} LoRA adapters on every block's attention qkv and proj ({trained:,} numbers)")
        rows.append(TrainedEncoder(
            f"{model_entry.name} finetune {mode}:{amount}", "finetune", f"finetune {mode}:{amount}",
            _digest({"model": encoder.fingerprint, "mode": mode, "amount": amount, "lr": options.finetune_lr,
                     **common}),
            vit_total, total - trained, recipe, options.finetune_lr, encoder.input_size,
            f"{model_entry.name} fine-tuned per training set: {what} trained with the output layer "
            f"(AdamW lr {options.finetune_lr:g}, output layer {options.lr:g}), everything else frozen, on "
            f"{encoder.input_size} px slices", options, slice_stride))
    return rows


def _pick(n: int, max_slices: int) -> np.ndarray:
    """Positions of at most ``max_slices`` of ``n`` slices, evenly spaced (first and last included)."""
    if n <= max_slices:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_slices).round().astype(int))


def _shrink(slices: np.ndarray, max_slices: int, sizes) -> dict[int, np.ndarray]:
    """One volume's kept slices after the stride ``[S, size, size]`` → {size: ``[S', size, size]`` float16}: at most
    ``max_slices`` of them (evenly spaced), resized as :meth:`Encoder.embed_slices` resizes (bilinear, antialiased)."""
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(slices[_pick(len(slices), max_slices)], dtype=np.float32))[:, None]
    out = {}
    for size in sizes:
        resized = x if size == x.shape[-1] else F.interpolate(x, size=(size, size), mode="bilinear",
                                                              align_corners=False, antialias=True)
        out[size] = resized[:, 0].numpy().astype(np.float16)
    return out


class SliceCollector:
    """Gives end-to-end ``entries`` their slices: ``collector(row, slices)`` takes one volume's kept slices after the
    stride (e.g. tapped from feature extraction, so a volume is read once); :meth:`read_missing` reads the rest."""

    def __init__(self, entries: list[TrainedEncoder], max_slices: int):
        self.entries, self.max_slices = entries, max_slices
        self.sizes = sorted({entry.size for entry in entries})

    def __call__(self, row: int, slices: np.ndarray) -> None:
        shrunk = _shrink(slices, self.max_slices, self.sizes)
        for entry in self.entries:
            entry.rows[int(row)] = shrunk[entry.size]

    def read_missing(self, used, preprocessing, slice_stride: int, workers: int) -> int:
        """Read the volumes of ``used`` (a ``read_manifest`` DataFrame) not collected yet; returns the number of
        (entry, volume) pairs that could not be read (one ``error:`` line per volume)."""
        from tqdm import tqdm

        if not self.entries:
            return 0
        done = set(self.entries[0].rows)
        missing = used.loc[[row for row in used.index if int(row) not in done]]
        if not len(missing):
            return 0
        records = missing.to_dict("records")
        reader = _SliceReader(records, [int(row) for row in missing.index], preprocessing, slice_stride,
                              self.max_slices, self.sizes)
        loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=max(0, workers),
                                             collate_fn=_as_is)
        failed = 0
        names = ", ".join(entry.name for entry in self.entries)
        for item in tqdm(loader, total=len(records), desc=f"slices ({names})", unit="vol", file=sys.stderr):
            if "failure" in item:
                failure = item["failure"]
                print(f"error: {records[item['position']]['path']}: {failure.cause} — {failure.hint}", file=sys.stderr)
                failed += len(self.entries)
                continue
            for entry in self.entries:
                entry.rows[item["row"]] = item["slices"][entry.size]
        return failed


class _SliceReader(torch.utils.data.Dataset):
    """Item ``i`` → dict(position, row, slices {size: [S, size, size] float16}) or dict(position, row, failure)."""

    def __init__(self, records: list[dict], labels: list[int], preprocessing, slice_stride: int, max_slices: int,
                 sizes: list[int]):
        self.records, self.labels, self.preprocessing = records, labels, preprocessing
        self.slice_stride, self.max_slices, self.sizes = slice_stride, max_slices, sizes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> dict:
        import pandas as pd

        from braindino.ingest.worker import VolumeFailure, prepare_volume

        record = self.records[position]
        index = None if pd.isna(record.get("volume_index")) else int(record["volume_index"])
        read = prepare_volume(record["path"], index, self.preprocessing)
        item = {"position": position, "row": self.labels[position]}
        if isinstance(read, VolumeFailure):
            return {**item, "failure": read}
        return {**item, "slices": _shrink(read[1].slices[::self.slice_stride], self.max_slices, self.sizes)}


def _as_is(item: dict) -> dict:
    return item
