"""``braindino prepare``: ingest a manifest's volumes into a memory-mapped slice store.

Exit status: 0 when every manifest row is stored (or already was), 1 when some volumes failed (see
``STORE/errors.csv``) or a worker process died, 2 when nothing could be done (bad manifest, incompatible store,
bad option) or the store cannot be written (full disk, no permission: volumes committed before are kept), 130 when
interrupted by Ctrl-C (what was finished is kept; rerun to continue).
"""

import argparse
import os
import sys
from concurrent.futures.process import BrokenProcessPool

from braindino.errors import InputError, error_line
from braindino.ingest.preprocess import FOREGROUND_METHODS, PreprocessConfig
from braindino.store.writer import prepare_store

BYTES_PER_MIB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PreprocessConfig()
    parser.add_argument("--manifest", required=True, metavar="CSV",
                        help="CSV with columns path, subject and optionally sequence, split, volume_index; "
                             "other columns are labels, carried into the store's volumes table")
    parser.add_argument("--out", required=True, metavar="STORE",
                        help="store folder; created if missing, else volumes not yet stored (or whose file "
                             "changed) are added")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), metavar="N",
                        help="processes that load and preprocess volumes (default: all usable cores)")
    parser.add_argument("--size", type=int, default=defaults.size, metavar="PIXELS",
                        help=f"output slices are SIZE x SIZE pixels (default {defaults.size})")
    parser.add_argument("--spacing", type=float, default=defaults.spacing_mm, metavar="MM",
                        help=f"in-plane pixel spacing after resampling, in mm (default {defaults.spacing_mm})")
    parser.add_argument("--foreground", choices=FOREGROUND_METHODS, default=defaults.foreground,
                        help="how the brain/head is told from background: 'nonzero' for skull-stripped images, "
                             "'otsu' threshold, or 'auto' to choose per volume (default)")
    parser.add_argument("--clip-percentiles", type=float, nargs=2, default=list(defaults.clip_percentiles),
                        metavar=("LOW", "HIGH"), help="intensity window, percentiles of foreground voxels, "
                        f"scaled to [0, 1] (default {defaults.clip_percentiles[0]} {defaults.clip_percentiles[1]})")
    parser.add_argument("--min-foreground", type=float, default=defaults.min_foreground_fraction,
                        metavar="FRACTION", help="drop axial slices whose foreground covers less than this share "
                        f"of the slice (default {defaults.min_foreground_fraction})")
    parser.add_argument("--shard-mb", type=float, default=1024, metavar="MIB",
                        help="largest shard file size in MiB (default 1024)")


def run(args: argparse.Namespace) -> int:
    try:
        config = PreprocessConfig(spacing_mm=args.spacing, size=args.size, foreground=args.foreground,
                                  clip_percentiles=tuple(args.clip_percentiles),
                                  min_foreground_fraction=args.min_foreground)
    except ValueError as err:
        print(f"braindino prepare: {err}", file=sys.stderr)
        return 2
    try:
        report = prepare_store(args.manifest, args.out, config, workers=max(1, args.workers),
                               shard_bytes=max(1, int(args.shard_mb * BYTES_PER_MIB)))
    except InputError as err:
        print(f"braindino prepare: {err}", file=sys.stderr)
        return 2
    except OSError as err:   # writing the store, as an OutputError (files that are read report errors per volume)
        print(f"braindino prepare: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"braindino prepare: interrupted — the volumes finished so far are stored in {args.out}; rerun the "
              f"same command to continue", file=sys.stderr)
        return 130
    except BrokenProcessPool:
        print(f"braindino prepare: a worker process died (out of memory?); the volumes finished so far are "
              f"stored in {args.out} — rerun with fewer --workers to continue", file=sys.stderr)
        return 1
    where = f" (see {os.path.join(args.out, 'errors.csv')})" if report.errors else ""
    print(f"braindino prepare: {report.summary()} -> {args.out}{where}")
    return 0 if report.ok else 1
