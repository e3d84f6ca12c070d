"""Online kNN monitor: how well the current encoder separates a manifest label, measured during training.

Each labelled volume is embedded as the mean CLS of a few evenly spaced slices; volumes of split ``train`` vote
(weighted cosine kNN) for those of ``val``/``test``. Without a ``split`` column, subjects are split in half by a
seeded draw.
"""

import numpy as np
import pandas as pd
import torch

from braindino.monitors import knn_accuracy


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
        self.is_train = np.array(is_train, dtype=bool)
        self.store = store
        self.slice_indices = []           # per volume: global slice indices to embed
        for row in labelled.index:
            slices = store.volume_slices(row)
            picks = np.linspace(0, len(slices) - 1, min(slices_per_volume, len(slices))).round().astype(int)
            self.slice_indices.append([slices[i] for i in np.unique(picks)])

    @torch.no_grad()
    def accuracy(self, embed, device: torch.device, image_size: int) -> float:
        """Embed every volume with ``embed`` (``[B, 1, S, S] → [B, D]``, called under no_grad) and return the
        accuracy of kNN votes from the training volumes on the other volumes."""
        embeddings = []
        for indices in self.slice_indices:
            images = torch.from_numpy(np.stack([self.store[i] for i in indices])).unsqueeze(1).to(device).float()
            images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                                     antialias=True, align_corners=False)
            embeddings.append(embed(images).float().mean(0))
        features = torch.stack(embeddings).cpu()
        labels = torch.as_tensor(self.labels)
        train = torch.as_tensor(self.is_train)
        if train.all() or not train.any():
            return float("nan")
        return knn_accuracy(features[train], labels[train], features[~train], labels[~train],
                            k=min(20, int(train.sum())))
