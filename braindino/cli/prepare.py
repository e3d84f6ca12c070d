"""``braindino prepare``: ingest a manifest's volumes into a memory-mapped slice store
(:func:`braindino.store.writer.prepare_store`).

A volume of implausible geometry (a foreground under 100 mm across, slices over 6 mm apart, an image of at most 16
distinct values) is stored with one ``warning:`` line naming it, or refused with ``--strict``.

Exit status: 0 when every manifest row is stored (or already was), 1 when some volumes failed (see
``STORE/errors.csv``) or a worker process died, 2 when nothing could be done (bad manifest, incompatible store,
bad option) or the store cannot be written (full disk, no permission: volumes committed before are kept), 130 when
interrupted by Ctrl-C (what was finished is kept; rerun to continue).
"""

import argparse
import os

from braindino.cli.arguments import add_out, add_workers, positive_int
from braindino.ingest.config import FOREGROUND_METHODS, PreprocessConfig

BYTES_PER_MIB = 1 << 20


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _percentile(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be in [0, 100], got {value}")
    return value


def add_arguments(parser) -> None:
    defaults = PreprocessConfig()
    parser.add_argument("--manifest", required=True, metavar="CSV",
                        help="CSV with columns path, subject and optionally sequence, split, volume_index; "
                             "other columns are labels, carried into the store's volumes table")
    add_out(parser, "STORE", "store folder; created if missing, else volumes not yet stored (or whose file changed) "
                             "are added")
    add_workers(parser)
    parser.add_argument("--size", type=positive_int, default=defaults.size, metavar="PIXELS",
                        help=f"output slices are SIZE x SIZE pixels (default {defaults.size})")
    parser.add_argument("--spacing", type=_positive, default=defaults.spacing_mm, metavar="MM",
                        help=f"in-plane pixel spacing after resampling, in mm (default {defaults.spacing_mm})")
    parser.add_argument("--foreground", choices=FOREGROUND_METHODS, default=defaults.foreground,
                        help="how the brain/head is told from background: 'nonzero' for skull-stripped images, "
                             "'otsu' for a head mask (a threshold just above the air's noise, never above Otsu's, "
                             "holes filled), or 'auto' to choose per volume (default)")
    parser.add_argument("--clip-percentiles", type=_percentile, nargs=2, default=list(defaults.clip_percentiles),
                        metavar=("LOW", "HIGH"), help="intensity window, percentiles of foreground voxels, "
                        f"scaled to [0, 1] (default {defaults.clip_percentiles[0]} {defaults.clip_percentiles[1]})")
    parser.add_argument("--min-foreground", type=_fraction, default=defaults.min_foreground_fraction,
                        metavar="FRACTION", help="drop axial slices whose foreground covers less than this share "
                        f"of the slice (default {defaults.min_foreground_fraction})")
    parser.add_argument("--strict", action="store_true",
                        help="refuse volumes of implausible geometry (foreground under 100 mm across, slices over "
                             "6 mm apart, at most 16 distinct values: a label map?) instead of storing them with "
                             "a warning line")
    parser.add_argument("--shard-mb", type=_positive, default=1024, metavar="MIB",
                        help="largest shard file size in MiB (default 1024)")


def interrupted(args) -> str:
    return f"the volumes finished so far are stored in {args.out}; rerun the same command to continue"


def run(args) -> int:
    from braindino.errors import InputError
    from braindino.store.writer import prepare_store

    low, high = args.clip_percentiles
    if not low < high:
        raise InputError("--clip-percentiles", f"LOW must be below HIGH, got {low:g} {high:g}",
                         "write e.g. --clip-percentiles 0.5 99.5")
    config = PreprocessConfig(spacing_mm=args.spacing, size=args.size, foreground=args.foreground,
                              clip_percentiles=(low, high), min_foreground_fraction=args.min_foreground)
    report = prepare_store(args.manifest, args.out, config, workers=max(1, args.workers),
                           shard_bytes=max(1, int(args.shard_mb * BYTES_PER_MIB)), strict=args.strict)
    where = f" (see {os.path.join(args.out, 'errors.csv')})" if report.errors else ""
    print(f"braindino prepare: {report.summary()} -> {args.out}{where}")
    return 0 if report.ok else 1
