"""Online kNN monitor: how well the current encoder separates a manifest label, measured during training.

Each labelled volume is embedded as the mean CLS of a few evenly spaced slices; volumes of split ``train`` vote
(weighted cosine kNN) for those of ``val``/``test``. Without a ``split`` column, subjects are split in half by a
seeded draw and the halves swap roles, so every volume is scored once (twice the test volumes of one split).
The accuracy comes with a 95 % interval from resampling subjects (their volumes together), so two encoders' values
can be read against the noise of a few dozen volumes.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from braindino.monitors import knn_predictions


@dataclass(frozen=True)
class KNNScore:
    accuracy: float     # share of scored volumes whose kNN vote is their label (NaN when nothing can be scored)
    low: float          # 95 % subject-bootstrap percentile interval of that share
    high: float
    volumes: int        # volumes scored


def subject_bootstrap_interval(correct: np.ndarray, subjects: np.ndarray, resamples: int = 1000,
                               seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of ``correct.mean()`` [V] under resampling whole subjects [V] with replacement."""
    codes, n_subjects = pd.factorize(subjects)[0], len(set(subjects))
    hits = np.bincount(codes, weights=correct, minlength=n_subjects)
    counts = np.bincount(codes, minlength=n_subjects)
    draws = np.random.default_rng(seed).integers(0, n_subjects, size=(resamples, n_subjects))
    shares = hits[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(shares, [2.5, 97.5])
    return float(low), float(high)


class OnlineKNN:
    def __init__(self, store, label: str, slices_per_volume: int, seed: int):
        volumes = store.volumes
        if label not in volumes.columns:
            raise ValueError(f"knn_label {label!r} is not a column of the store's manifest labels")
        labelled = volumes[volumes[label].notna()].copy()
        split = labelled["split"] if "split" in labelled.columns else pd.Series("", index=labelled.index)
        if (split == "train").any() and (split != "train").any():
            is_train = (split == "train").to_numpy()
        else:
            subjects = labelled["subject"].unique()
            train_subjects = set(np.random.default_rng(seed).permutation(subjects)[: len(subjects) // 2])
            is_train = labelled["subject"].isin(train_subjects).to_numpy()
        self.labels = pd.factorize(labelled[label])[0]
        self.subjects = labelled["subject"].astype(str).to_numpy()
        self.is_train = np.array(is_train, dtype=bool)
        self.swap_halves = not (split == "train").any() or (split == "train").all()
        self.store = store
        self.slice_indices = []           # per volume: global slice indices to embed
        for row in labelled.index:
            slices = store.volume_slices(row)
            picks = np.linspace(0, len(slices) - 1, min(slices_per_volume, len(slices))).round().astype(int)
            self.slice_indices.append([slices[i] for i in np.unique(picks)])

    @torch.no_grad()
    def accuracy(self, embed, device: torch.device, image_size: int) -> KNNScore:
        """Embed every volume with ``embed`` (``[B, 1, S, S] → [B, D]``, called under no_grad) and score the kNN
        votes of the training volumes for the other volumes (and, for a seeded half split, the other way round)."""
        embeddings = []
        for indices in self.slice_indices:
            images = torch.from_numpy(self.store.read_slices(indices)).unsqueeze(1).to(device).float()
            images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                                     antialias=True, align_corners=False)
            embeddings.append(embed(images).float().mean(0))
        features = torch.stack(embeddings).cpu()
        labels = torch.as_tensor(self.labels)
        if self.is_train.all() or not self.is_train.any():
            return KNNScore(float("nan"), float("nan"), float("nan"), 0)
        correct = np.full(len(self.labels), np.nan)
        for voters in ([self.is_train, ~self.is_train] if self.swap_halves else [self.is_train]):
            scored = ~voters
            predicted = knn_predictions(features[voters], labels[voters], features[scored],
                                        k=min(20, int(voters.sum())))
            correct[scored] = (predicted == labels[scored]).numpy()
        tested = ~np.isnan(correct)
        low, high = subject_bootstrap_interval(correct[tested], self.subjects[tested])
        return KNNScore(float(correct[tested].mean()), low, high, int(tested.sum()))
