"""``braindino extract``: embed a manifest's volumes with a frozen encoder into a features folder.

Exit status: 0 when every manifest row was embedded (or already was: a re-run only reads what changed), 1 when
some volumes failed (one ``error:`` line each, and ``FEATURES/errors.csv``), 2 when nothing could be done (bad
model or manifest, a features folder of another model, an unwritable folder).
"""

import argparse
import os
import sys

from braindino.cli import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="model folder (braindino export, or a natural-image timm local-dir ViT), "
                             "random:<arch>[:seed] or pixels[:grid]")
    parser.add_argument("--manifest", required=True, metavar="CSV", help="manifest CSV (path, subject, ...)")
    parser.add_argument("--out", required=True, metavar="FEATURES",
                        help="features folder: index.csv, errors.csv, model.json, volumes/*.safetensors; one "
                             "folder per model (volumes already embedded by the same model are reused)")
    parser.add_argument("--patch-tokens", action="store_true",
                        help="also store the patch tokens [S, N, D] (float16; large)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="slices per forward pass")
    parser.add_argument("--slice-stride", type=positive_int, default=1, metavar="K",
                        help="embed every K-th kept axial slice only (K times faster; default 1: every slice)")
    parser.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))), metavar="N",
                        help="processes that read and preprocess volumes (0: in the main process)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")


def run(args: argparse.Namespace) -> int:
    from braindino.encoder import load_encoder
    from braindino.errors import InputError, error_line
    from braindino.extract.cohort import extract_cohort

    try:
        encoder = load_encoder(args.model, device=args.device)
        _features, report = extract_cohort(encoder, args.manifest, args.out, batch_size=args.batch_size,
                                           workers=args.workers, patch_tokens=args.patch_tokens,
                                           slice_stride=args.slice_stride)
    except (InputError, OSError) as err:   # a write error is an OutputError naming the folder and space needed
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    where = f" (see {os.path.join(args.out, 'errors.csv')})" if report.errors else ""
    print(f"braindino extract: {report.summary()} -> {args.out}{where}")
    return 1 if report.errors else 0
