"""Probe throughput: linear probes on 1,000 cached volumes × 5 training fractions × 5 seeds.

Writes a features folder of synthetic random features in the ``braindino extract`` format (1,000 volumes of 24
slices, D = 192 as ViT-Ti: bags [24, 384]), reads it back through the probe's own loading and pooling, and runs
the split protocol (800 training / 200 test subjects, a binary label carried by one feature) for one encoder.
Prints seconds for: loading + pooling, fitting + predicting the 25 probes (no bootstrap), and the same with the
default 1,000-resample subject bootstrap of every metric. Target: probes < 60 s on 2 cores.

    python bench/bench_probe.py [--volumes 1000] [--workers 2] [--bootstrap 1000]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from braindino.extract import open_features
from braindino.extract.features import volume_file, write_volume_features
from braindino.probe.endpoints import EndpointSpec, SubjectTable
from braindino.probe.evaluate import evaluate_endpoint, plan_endpoint
from braindino.probe.inputs import SubjectBags, feature_rows
from braindino.probe.protocols import parse_settings

SLICES, DIM = 24, 192
GEOMETRY = {"affine": np.eye(4), "native_affine": np.eye(4), "native_shape": (64, 64, 24)}


class _Bar:
    def update(self, n):
        pass


def write_features(root: Path, n: int, rng) -> tuple[pd.DataFrame, np.ndarray]:
    """n volumes of random features (label 1 shifts feature 0 of every slice) → (manifest, labels [n])."""
    labels = rng.integers(0, 2, n)
    rows = []
    for i in range(n):
        cls = rng.normal(size=(SLICES, DIM)).astype(np.float32)
        cls[:, 0] += labels[i]
        key = f"{i:016x}"
        write_volume_features(root / volume_file(key), cls, rng.normal(size=(SLICES, DIM)).astype(np.float32),
                              np.arange(SLICES), GEOMETRY)
        rows.append({"path": f"/bench/sub-{i:04d}.nii.gz", "subject": f"sub-{i:04d}", "sequence": "",
                     "split": "test" if i % 5 == 0 else "train", "volume_index": pd.NA, "dx": int(labels[i]),
                     "feature_file": volume_file(key), "model_fingerprint": "0" * 16, "content_hash": key,
                     "n_slices": SLICES})
    index = pd.DataFrame(rows)
    index.to_csv(root / "index.csv", index=False)
    (root / "errors.csv").write_text("path,subject,sequence,cause,hint\n")
    (root / "model.json").write_text(json.dumps({"name": "bench", "fingerprint": "0" * 16, "preprocessing": {},
                                                 "input_size": 224, "embed_dim": DIM, "patch_size": 16,
                                                 "grid": [14, 14]}))
    manifest = index.drop(columns=["feature_file", "model_fingerprint", "content_hash", "n_slices"])
    manifest["volume_index"] = manifest["volume_index"].astype("Int64")
    return manifest, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        manifest, labels = write_features(root, args.volumes, rng)
        started = time.perf_counter()
        features = open_features(root)
        spec = EndpointSpec("dx", "classification", target="dx")
        subjects = manifest["subject"].to_numpy()
        table = SubjectTable(spec, [""], subjects, subjects, [{"": i} for i in range(len(manifest))],
                             manifest["split"].to_numpy(), {"code": labels}, ["0", "1"])
        inputs = SubjectBags(table, features, feature_rows(features, manifest)).pooled("mean", "concat")
        loaded = time.perf_counter() - started
        seeds = [0, 1, 2, 3, 4]
        plan = plan_endpoint(table, parse_settings([1, 10, 25, 50, 100], []), seeds, 5, False, "bench")
        encoders = [dict(name="bench", parameters=5_500_000, inputs=inputs)]
        timings = {}
        for n_bootstrap in (0, args.bootstrap):
            started = time.perf_counter()
            result, _ = evaluate_endpoint(table, plan, encoders, seeds, n_bootstrap, 0.95, args.workers, _Bar())
            timings[n_bootstrap] = time.perf_counter() - started
        auc = result.aggregate("bench", "100%", "auc")
    print(f"load + pool {args.volumes} cached volumes: {loaded:.1f} s")
    print(f"25 linear probes (5 fractions x 5 seeds), {args.workers} workers: {timings[0]:.1f} s "
          f"(target < 60 s); with {args.bootstrap}-resample bootstrap CIs: {timings[args.bootstrap]:.1f} s")
    print(f"sanity: AUC at 100% = {auc.mean:.3f} ± {auc.std:.3f}")
    print(f"BENCH | 25 linear probes on {args.volumes} cached volumes (no bootstrap) | {timings[0]:.1f} s | < 60 s")


if __name__ == "__main__":
    main()
