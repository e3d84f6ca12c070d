"""One trainer for the rows that learn end to end on a training set's labels: a network from scratch
(:mod:`heads.scratch`) or a pretrained ViT being fine-tuned (:mod:`heads.finetune`).

Inputs are slice bags: ``V`` samples, each a list of ``n_seq`` arrays ``[S, H, W]`` (one per sequence, in fusion
order; slices in [0, 1]) — a list of such samples or a :class:`SliceBags`. The network
(:class:`BagNetwork`) embeds every slice with the backbone (``[T, F]``), pools each volume's slices (mean, max or
meanmax → ``[F']``), fuses a sample's sequences (concat ``[n_seq·F']`` or mean ``[F']``) and maps that to the
task's outputs with one linear layer. Losses as the other torch heads (:mod:`heads.torch_head`): cross-entropy
(class-balanced weights), MSE on the standardised target, Cox partial likelihood (Breslow, per mini-batch).

Training: AdamW on the parameters that require gradients (the backbone's at ``backbone_lr`` when given, the output
layer's at ``lr``), mini-batches of ``batch_size`` samples, at most
``epochs`` epochs; with at least ``min_validation_subjects`` training subjects, ``validation_fraction`` of them (by
subject: ``groups``; stratified by class) are held out and training stops after ``patience`` epochs without a lower
validation loss, keeping the best epoch's weights; with fewer, every epoch runs on every training sample. The
backbone's ``frozen`` part is computed once per sample before training. Deterministic given ``random_state``
(a private torch RNG fork and a numpy Generator; the global RNG is left as it was).
"""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from sklearn.preprocessing import LabelEncoder
from torch import nn

from heads.cox import cox_partial_likelihood_loss
from heads.grouping import group_splits
from heads.targets import check_task, survival_arrays, task_score

POOLINGS = ("mean", "max", "meanmax")
FUSIONS = ("concat", "mean")
FROZEN_CHUNK = 64


class SliceBags:
    """``V`` samples of slices packed into one array (one buffer to share with worker processes).

    ``slices`` ``[T, H, W]`` float16; ``spans[v]`` = [(start, stop)] per sequence of sample ``v``; ``bags[v]`` (or
    ``self[v]``) = the list of its ``[S, H, W]`` arrays (views)."""

    def __init__(self, samples: list[list[np.ndarray]]):
        arrays = [np.asarray(a) for sample in samples for a in sample]
        self.slices = (np.concatenate(arrays).astype(np.float16, copy=False) if arrays
                       else np.zeros((0, 1, 1), np.float16))
        self.spans, start = [], 0
        for sample in samples:
            spans = []
            for array in sample:
                spans.append((start, start + len(array)))
                start += len(array)
            self.spans.append(spans)

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, v: int) -> list[np.ndarray]:
        return [self.slices[a:b] for a, b in self.spans[v]]

    def __iter__(self):
        return (self[v] for v in range(len(self)))


def check_slice_bags(bags) -> list[list[np.ndarray]]:
    """``bags`` as a list of samples, each a non-empty list of ``[S >= 1, H, W]`` arrays of one count per sample."""
    samples = [list(sample) for sample in bags]
    if not samples:
        raise ValueError("no samples")
    for sample in samples:
        if len(sample) != len(samples[0]) or any(np.ndim(a) != 3 or len(a) == 0 for a in sample):
            raise ValueError("every sample must hold one [S >= 1, H, W] array per sequence, the same number each")
    return samples


class BagNetwork(nn.Module):
    """``backbone`` (``[T, ...]`` → ``[T, F]``) + per-volume ``pooling`` + sequence ``fusion`` + Linear →
    ``[V, n_outputs]``; :meth:`forward` takes the backbone inputs of all slices ``z`` ``[T, ...]`` and the slice
    ``spans`` of every (sample, sequence), sample-major (``n_sequences`` per sample)."""

    def __init__(self, backbone: nn.Module, n_sequences: int, n_outputs: int, pooling: str, fusion: str):
        super().__init__()
        self.backbone, self.n_sequences, self.pooling, self.fusion = backbone, n_sequences, pooling, fusion
        width = backbone.out_features * (2 if pooling == "meanmax" else 1)
        self.output = nn.Linear(width * (n_sequences if fusion == "concat" else 1), n_outputs)

    def _pool(self, slices: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            return slices.mean(dim=0)
        if self.pooling == "max":
            return slices.max(dim=0).values
        return torch.cat([slices.mean(dim=0), slices.max(dim=0).values])

    def forward(self, z: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        embedded = self.backbone(z)                                                   # [T, F]
        pooled = torch.stack([self._pool(embedded[a:b]) for a, b in spans])          # [V·n_seq, F']
        pooled = pooled.reshape(len(spans) // self.n_sequences, self.n_sequences, -1)
        fused = pooled.flatten(1) if self.fusion == "concat" else pooled.mean(dim=1)  # [V, n_seq·F'] or [V, F']
        return self.output(fused)


class SliceNetworkHead(BaseEstimator):
    """``fit(bags, y, groups=None)``, ``predict(bags) -> [V]``, ``predict_proba(bags) -> [V, n_classes]``,
    ``score``. ``backbone``: a picklable recipe, ``backbone() -> nn.Module`` with ``out_features``, ``frozen(x)``
    and ``forward(frozen(x)) -> [B, F]`` for ``x`` ``[B, 1, H, W]``.

    Fitted attributes: ``network_`` (:class:`BagNetwork`), ``classes_`` (classification), ``trained_parameters_``
    (numbers AdamW updated, output layer included), ``frozen_parameters_`` (the others), ``epochs_run_``,
    ``best_epoch_``, ``n_validation_`` (held-out training subjects; 0 = no early stopping)."""

    def __init__(self, task: str, backbone, pooling: str = "mean", fusion: str = "concat", epochs: int = 30,
                 lr: float = 3e-3, backbone_lr: float | None = None, weight_decay: float = 1e-2, batch_size: int = 4,
                 patience: int = 5,
                 validation_fraction: float = 0.2, min_validation_subjects: int = 8, device: str = "cpu",
                 random_state: int = 0):
        self.task = task
        self.backbone = backbone
        self.pooling = pooling
        self.fusion = fusion
        self.epochs = epochs
        self.lr = lr
        self.backbone_lr = backbone_lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.min_validation_subjects = min_validation_subjects
        self.device = device
        self.random_state = random_state

    # ----------------------------------------------------------------------------------------------- fitting
    def fit(self, bags, y, groups=None):
        check_task(self.task)
        if self.pooling not in POOLINGS or self.fusion not in FUSIONS:
            raise ValueError(f"pooling must be one of {POOLINGS} and fusion one of {FUSIONS}")
        samples = check_slice_bags(bags)
        targets, n_outputs = self._encode_targets(y)
        if len(samples) != len(targets[0]):
            raise ValueError(f"{len(samples)} samples but {len(targets[0])} targets")
        groups = np.arange(len(samples)) if groups is None else np.asarray(groups)
        train, validation = self._validation_split(groups)
        rng = np.random.default_rng(self.random_state)
        device = torch.device(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            network = BagNetwork(self.backbone(), len(samples[0]), n_outputs, self.pooling, self.fusion).to(device)
            self.network_ = network.eval()
            z = self._frozen(samples)
            trained = [p for p in network.parameters() if p.requires_grad]
            keep = ({name for name, p in network.named_parameters() if p.requires_grad}
                    | {name for name, _ in network.named_buffers()})   # the best epoch's state: what trains + BN stats
            self.trained_parameters_ = int(sum(p.numel() for p in trained))
            self.frozen_parameters_ = int(sum(p.numel() for p in network.parameters())) - self.trained_parameters_
            head = list(network.output.parameters())
            body = [p for p in network.backbone.parameters() if p.requires_grad]
            optimiser = torch.optim.AdamW([{"params": head, "lr": self.lr},
                                           {"params": body, "lr": self.backbone_lr or self.lr}],
                                          weight_decay=self.weight_decay)
            best, best_loss, waited = None, np.inf, 0
            self.epochs_run_ = self.best_epoch_ = 0
            for epoch in range(1, self.epochs + 1):
                network.train()
                for batch in self._batches(rng.permutation(train)):
                    optimiser.zero_grad()
                    loss = self._loss(self._forward(z, batch), targets, batch)
                    loss.backward()
                    optimiser.step()
                self.epochs_run_ = epoch
                if not len(validation):
                    continue
                with torch.no_grad():
                    network.eval()
                    loss = float(self._loss(self._forward(z, validation), targets, validation))
                if loss < best_loss - 1e-6:
                    best_loss, waited, self.best_epoch_ = loss, 0, epoch
                    best = {k: v.detach().clone() for k, v in network.state_dict().items() if k in keep}
                else:
                    waited += 1
                    if waited >= self.patience:
                        break
            if best is not None:
                network.load_state_dict(best, strict=False)
            self.best_epoch_ = self.best_epoch_ or self.epochs_run_
        network.eval()
        return self

    def _validation_split(self, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(training positions, validation positions): a subject-grouped (and for classification stratified)
        hold-out of about ``validation_fraction`` of the subjects, or no validation with too few subjects or when
        it would leave a class out of training."""
        everything = np.arange(len(groups))
        n_subjects = len(np.unique(groups))
        self.n_validation_ = 0
        if n_subjects < max(self.min_validation_subjects, 2) or not 0 < self.validation_fraction < 1:
            return everything, everything[:0]
        n_splits = max(2, int(round(1 / self.validation_fraction)))
        labels = self._codes if self.task == "classification" else None
        try:
            train, validation = group_splits(n_splits, self.random_state, len(groups), labels, groups)[0]
        except ValueError:
            return everything, everything[:0]
        if labels is not None and len(np.unique(labels[train])) < len(self.classes_):
            return everything, everything[:0]
        if self.task == "survival" and not self._event[validation].any():
            return everything, everything[:0]
        self.n_validation_ = len(np.unique(groups[validation]))
        return train, validation

    def _batches(self, order: np.ndarray) -> list[np.ndarray]:
        """``order`` in chunks of ``batch_size`` samples; a last chunk of one sample joins the one before (batch
        norm needs more than one value per channel)."""
        size = max(1, int(self.batch_size))
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        if len(chunks) > 1 and len(chunks[-1]) < 2:
            last = chunks.pop()
            chunks[-1] = np.concatenate([chunks[-1], last])
        return chunks

    def _frozen(self, samples: list[list[np.ndarray]]) -> list[list[torch.Tensor]]:
        """The backbone's frozen part of every sample's slices, once: per sample, per sequence ``[S, ...]``."""
        out = []
        device = torch.device(self.device)
        backbone = self.network_.backbone
        with torch.no_grad():
            for sample in samples:
                parts = []
                for array in sample:
                    x = torch.from_numpy(np.asarray(array, dtype=np.float32))[:, None].to(device)
                    parts.append(torch.cat([backbone.frozen(x[i:i + FROZEN_CHUNK])
                                            for i in range(0, len(x), FROZEN_CHUNK)]))
                out.append(parts)
        return out

    def _forward(self, z: list[list[torch.Tensor]], batch: np.ndarray) -> torch.Tensor:
        """Outputs ``[len(batch), n_outputs]`` of the samples ``batch``."""
        pieces, spans, start = [], [], 0
        for v in batch:
            for part in z[v]:
                pieces.append(part)
                spans.append((start, start + len(part)))
                start += len(part)
        return self.network_(torch.cat(pieces), spans)

    # ----------------------------------------------------------------------------------------------- targets
    def _encode_targets(self, y) -> tuple[tuple[torch.Tensor, ...], int]:
        if self.task == "classification":
            encoder = LabelEncoder()
            codes = encoder.fit_transform(np.asarray(y))
            self.classes_, self._codes = encoder.classes_, codes
            if len(self.classes_) < 2:
                raise ValueError("classification needs at least two classes in the training data")
            counts = np.bincount(codes, minlength=len(self.classes_))
            self._class_weight = torch.as_tensor(len(codes) / (len(counts) * counts), dtype=torch.float32)
            return (torch.as_tensor(codes, dtype=torch.long),), len(self.classes_)
        if self.task == "regression":
            values = np.asarray(y, dtype=np.float64)
            self.target_mean_, self.target_scale_ = float(values.mean()), float(values.std() or 1.0)
            standardised = (values - self.target_mean_) / self.target_scale_
            return (torch.as_tensor(standardised, dtype=torch.float32),), 1
        time, event = survival_arrays(y)
        if not event.any():
            raise ValueError("survival needs at least one event in the training data")
        self._event = event
        return (torch.as_tensor(time, dtype=torch.float32), torch.as_tensor(event)), 1

    def _loss(self, outputs: torch.Tensor, targets: tuple[torch.Tensor, ...], batch: np.ndarray) -> torch.Tensor:
        index = torch.as_tensor(np.asarray(batch), dtype=torch.long)
        device = outputs.device
        if self.task == "classification":
            return F.cross_entropy(outputs, targets[0][index].to(device), weight=self._class_weight.to(device))
        if self.task == "regression":
            return F.mse_loss(outputs[:, 0], targets[0][index].to(device))
        return cox_partial_likelihood_loss(outputs[:, 0], targets[0][index].to(device), targets[1][index].to(device))

    # ----------------------------------------------------------------------------------------------- prediction
    def _outputs(self, bags) -> torch.Tensor:
        samples = check_slice_bags(bags)
        self.network_.eval()
        z = self._frozen(samples)
        with torch.no_grad():
            size = max(1, int(self.batch_size))
            parts = [self._forward(z, np.arange(i, min(i + size, len(samples)))) for i in range(0, len(samples), size)]
        return torch.cat(parts).float().cpu()

    def predict(self, bags) -> np.ndarray:
        """``[V]``: class labels, regression values, or survival risk scores (higher = earlier event)."""
        outputs = self._outputs(bags)
        if self.task == "classification":
            return self.classes_[outputs.argmax(dim=1).numpy()]
        if self.task == "regression":
            return outputs[:, 0].double().numpy() * self.target_scale_ + self.target_mean_
        return outputs[:, 0].double().numpy()

    def predict_proba(self, bags) -> np.ndarray:
        """``[V, n_classes]`` class probabilities (classification only), columns in ``classes_`` order."""
        if self.task != "classification":
            raise ValueError(f"predict_proba is for classification, not {self.task}")
        return torch.softmax(self._outputs(bags), dim=1).double().numpy()

    def score(self, bags, y) -> float:
        """Accuracy (classification), R² (regression) or Harrell's C-index (survival)."""
        return task_score(self.task, y, self.predict(bags))
