"""Head inputs per sample (subject, or volume) from a features folder: slice bags, pooling, multi-sequence fusion.

A volume's bag is ``[S, 2D]``: each slice's CLS token concatenated with its mean patch token. The CLS token carries
the encoder's global summary of the slice, the mean patch token the average of its local features; a linear head
over both can weight whichever of the two carries the endpoint (cheap: the features are cached anyway).

Pooling ``hemispheres`` (for the side of a one-sided finding) uses another bag, ``[S, 2P]`` per volume: each
slice's per-hemisphere mean patch features (``left``, ``right`` ``[P]``, the grid's patient-Left and -Right halves)
as ``left - right`` ‖ ``(left + right) / 2``, pooled with ``meanmax`` → ``[4P]``: the mean and the max over slices
of the signed difference and of the average. A focal lesion in a few slices raises the max of the difference in
the features that respond to it when it is on the left, and not when it is on the right, so a linear head finds
the side; mean-pooled whole-slice tokens (``mean``) carry no such sign. Needs features with ``hemispheres``
(extracted by this braindino).

Fusion of a subject's sequences (in the endpoint's order): pooled heads pool each sequence's bag, then ``concat``
the pooled vectors (``[n_seq·P]``) or take their ``mean`` (``[P]``); attention-MIL ``concat`` stacks the sequences'
slices into one bag (``[ΣS, 2D]``), ``mean`` averages the sequences' slice features at the axial positions (z) all
of them have (``[S∩, 2D]``). With the volume unit each sample is one volume: its bag alone, nothing fused.
"""

import numpy as np
import pandas as pd

from braindino.errors import InputError
from braindino.probe.endpoints import SubjectTable


def feature_rows(features, manifest) -> dict[int, int]:
    """{manifest row index: features index position} for the manifest rows the features folder holds, matched on
    (absolute path, volume_index)."""
    def key(path, volume_index):
        return (str(path), None if pd.isna(volume_index) else int(volume_index))
    index = features.index
    volume_indices = index["volume_index"] if "volume_index" in index.columns else [None] * len(index)
    position = {key(p, v): i for i, (p, v) in enumerate(zip(index["path"], volume_indices))}
    manifest_indices = manifest["volume_index"] if "volume_index" in manifest.columns else [None] * len(manifest)
    found = {}
    for row, path, volume_index in zip(manifest.index, manifest["path"], manifest_indices):
        i = position.get(key(path, volume_index))
        if i is not None:
            found[int(row)] = i
    return found


def volume_bag(loaded: dict) -> np.ndarray:
    """``[S, 2D]`` float32: CLS ``[S, D]`` ‖ mean patch ``[S, D]`` of one volume's features."""
    return np.concatenate([loaded["cls"], loaded["mean_patch"]], axis=1).astype(np.float32)


def hemisphere_bag(loaded: dict, where) -> np.ndarray:
    """``[S, 2P]`` float32: ``left - right`` ‖ ``(left + right) / 2`` of one volume's ``hemispheres`` ``[S, 2, P]``;
    InputError (naming ``where``) for features extracted before ``hemispheres`` existed."""
    if "hemispheres" not in loaded:
        raise InputError(where, "features hold no per-hemisphere patch means (made by an older braindino)",
                         "re-extract with this braindino (braindino extract, or leave out --features)")
    left, right = loaded["hemispheres"][:, 0], loaded["hemispheres"][:, 1]
    return np.concatenate([left - right, (left + right) / 2], axis=1).astype(np.float32)


class SubjectBags:
    """Every sample's per-sequence bags for one encoder, samples in table order.

    ``bags[i][sequence]`` = ``[S, 2D]`` (:func:`volume_bag`; :func:`hemisphere_bag` ``[S, 2P]`` when the table's
    pooling is ``hemispheres``); ``z[i][sequence]`` = ``[S]`` axial indices. Subject unit: one entry per fused
    sequence; volume unit: one entry (the volume's own sequence) and nothing is fused.
    """

    def __init__(self, table: SubjectTable, features, rows: dict[int, int]):
        self.sequences = table.sequences
        self.per_volume = table.spec.unit == "volume"
        self.bags, self.z = [], []
        hemispheres = table.spec.pooling == "hemispheres"
        for sample_rows in table.rows:
            bags, zs = {}, {}
            for sequence, row in sample_rows.items():
                loaded = features.load(rows[row])
                bags[sequence] = (hemisphere_bag(loaded, features.path(rows[row])) if hemispheres
                                  else volume_bag(loaded))
                zs[sequence] = np.asarray(loaded["z"])
            self.bags.append(bags)
            self.z.append(zs)

    def _keys(self, i: int) -> list[str]:
        """The sequences of sample ``i``'s input, in fusion order."""
        return list(self.bags[i]) if self.per_volume else self.sequences

    def pooled(self, method: str, fusion: str) -> np.ndarray:
        """``[n, P]`` pooled, fused inputs: P = n_seq × width (concat) or width (mean, and the volume unit);
        width = 2D (mean, max) or 4D (meanmax; hemispheres: meanmax of the hemisphere bags)."""
        from heads import SlicePooling

        method = "meanmax" if method == "hemispheres" else method
        n_keys = 1 if self.per_volume else len(self.sequences)
        per_sequence = []
        for k in range(n_keys):
            bags = [sample[self._keys(i)[k]] for i, sample in enumerate(self.bags)]
            per_sequence.append(SlicePooling(method).fit(bags).transform(bags))
        stacked = np.stack(per_sequence)                       # [n_seq, n, width]
        if fusion == "mean":
            return stacked.mean(axis=0).astype(np.float32)
        return np.concatenate(list(stacked), axis=1).astype(np.float32)

    def mil(self, fusion: str, where="features") -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
        """One bag per sample: ``[ΣS, 2D]`` (concat) or ``[S∩, 2D]`` at shared z (mean), and each bag's slices as
        (sequence [S'] str, z [S'] int) — the rows of attention weights."""
        fused, slices = [], []
        for i, (sample_bags, sample_z) in enumerate(zip(self.bags, self.z)):
            keys = self._keys(i)
            if fusion == "concat" or len(keys) == 1:
                fused.append(np.concatenate([sample_bags[s] for s in keys]))
                slices.append((np.concatenate([[s] * len(sample_z[s]) for s in keys]),
                               np.concatenate([sample_z[s] for s in keys])))
                continue
            shared = set.intersection(*(set(sample_z[s].tolist()) for s in keys))
            if not shared:
                raise InputError(where, "the sequences of a subject share no axial slice, so their slice "
                                        "features cannot be averaged", "use --fusion concat")
            shared = sorted(shared)
            positions = [{int(z): j for j, z in enumerate(sample_z[s])} for s in keys]
            fused.append(np.mean([sample_bags[s][[where_z[z] for z in shared]]
                                  for s, where_z in zip(keys, positions)], axis=0))
            slices.append((np.array(["+".join(keys)] * len(shared)), np.array(shared)))
        return fused, slices


def check_fingerprint(features, encoder, where) -> None:
    """Raise InputError when a features folder was made by another model than ``encoder``."""
    made_by = features.model.get("fingerprint")
    if made_by != encoder.fingerprint:
        raise InputError(where, f"features were made by {features.model.get('name')!r} [{made_by}], not by "
                                f"{encoder.name!r} [{encoder.fingerprint}]",
                         "extract features with this --model, or pass the model that made them")


def sample_inputs(table: SubjectTable, features, rows: dict[int, int], where="features"):
    """Head inputs of every sample of ``table`` from ``features`` (``rows``: manifest row → features key): pooled
    ``[n, P]`` by the endpoint's pooling and fusion, or a list of MIL bags ``[slices, P]`` for ``pooling: mil``."""
    bags = SubjectBags(table, features, rows)
    if table.spec.pooling == "mil":
        return bags.mil(table.spec.fusion, where)[0]
    return bags.pooled(table.spec.pooling, table.spec.fusion)
