"""Cohort extraction benchmark: how close ``braindino extract`` gets to the encoder's own speed.

Measured in one run, on one machine, on the same slices:
  (a) wall time of a full cohort extraction into a fresh features folder (hashing, reading and preprocessing in
      ``--workers`` DataLoader processes, batching slices across volumes, forward passes, atomic writes);
  (b) encoder-only time: the same preprocessed slices, already in memory, through ``Encoder.embed_slices`` in
      batches of ``--batch-size``.
Printed: (a) / (b). Target on CPU: <= 1.15 (reading and preprocessing hide behind the forward passes).

    braindino synth --out /tmp/enc_cohort --subjects 4 --seed 3 --resolution 2
    python bench/bench_extract.py --manifest /tmp/enc_cohort/manifest.csv [--model random:vit_tiny] [--workers 2]
"""

import argparse
import tempfile
import time

import numpy as np
import pandas as pd
import torch

import braindino
from braindino.encoder.volume import ingest_source
from braindino.extract.cohort import auto_reader_workers, extract_cohort
from braindino.manifest import read_manifest

TARGET_RATIO = 1.15


def encoder_only_seconds(encoder, slices: np.ndarray, batch_size: int) -> float:
    """Seconds to embed ``slices`` ``[S, size, size]`` float16 in batches, nothing else."""
    started = time.perf_counter()
    for start in range(0, len(slices), batch_size):
        encoder.embed_slices(torch.from_numpy(slices[start:start + batch_size])[:, None])
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--model", default="random:vit_tiny")
    parser.add_argument("--workers", type=int, default=None,
                        help="reader processes (default: extraction's own choice, auto_reader_workers)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="(extraction, encoder-only) pairs; the median "
                        "ratio is reported (default 3)")
    args = parser.parse_args()

    encoder = braindino.load_encoder(args.model, device=args.device)
    manifest = read_manifest(args.manifest)
    encoder.embed_slices(torch.zeros(2, 1, encoder.preprocessing.size, encoder.preprocessing.size))   # warm-up
    rows = manifest.to_dict("records")
    slices = np.concatenate([ingest_source(row["path"], None if pd.isna(row["volume_index"]) else
                                           int(row["volume_index"]), encoder.preprocessing)[1].slices
                             for row in rows])
    pairs = []   # (extraction, encoder-only) measured alternately: a busy moment of the machine hits one pair only
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench_extract_") as out:
            started = time.perf_counter()
            features, report = extract_cohort(encoder, manifest, out, batch_size=args.batch_size,
                                              workers=args.workers, progress=False)
            extract_s = time.perf_counter() - started
        pairs.append((extract_s, encoder_only_seconds(encoder, slices, args.batch_size)))
    extract_s, forward_s = sorted(pairs, key=lambda pair: pair[0] / pair[1])[len(pairs) // 2]
    ratio = extract_s / forward_s
    workers = auto_reader_workers([encoder]) if args.workers is None else args.workers
    print(f"model {encoder.name} on {encoder.device}, {len(rows)} volumes, {len(slices)} slices, "
          f"{workers} reader processes{' (auto)' if args.workers is None else ''}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"(a) extraction wall time {extract_s:.2f}s ({report.summary()})")
    print(f"(b) encoder-only forward {forward_s:.2f}s ({len(slices) / forward_s:.1f} slices/s)")
    print(f"ratio (a)/(b) = {ratio:.3f} (target <= {TARGET_RATIO}; median of "
          f"{', '.join(f'{a / b:.3f}' for a, b in pairs)})")
    print(f"BENCH | cohort extraction ÷ encoder-only forward ({encoder.name}, {len(slices)} slices) | {ratio:.3f} | "
          f"≤ {TARGET_RATIO}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
