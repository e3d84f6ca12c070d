"""``braindino extract``: embed a manifest's volumes with a frozen encoder into a features folder
(:func:`braindino.extract.extract_cohort`).

Exit status: 0 when every manifest row was embedded (or already was: a re-run only reads what changed), 1 when
some volumes failed (one ``error:`` line each, and ``FEATURES/errors.csv``), 2 when nothing could be done (bad
model or manifest, a features folder of another model, an unwritable folder).
"""

import os

from braindino.cli.arguments import add_encoder_arguments, add_extraction_arguments, add_out


def add_arguments(parser) -> None:
    add_encoder_arguments(parser, baselines=False)
    parser.add_argument("--manifest", required=True, metavar="CSV", help="manifest CSV (path, subject, ...)")
    add_out(parser, "FEATURES", "features folder: index.csv, errors.csv, model.json, volumes/*.safetensors; one "
                                "folder per model (volumes already embedded by the same model are reused)")
    parser.add_argument("--patch-tokens", action="store_true",
                        help="also store the patch tokens [S, N, D] (float16; large)")
    add_extraction_arguments(parser, auto_workers=True)


def interrupted(args) -> str:
    return f"the volumes embedded so far are kept in {args.out}; rerun to continue"


def run(args) -> int:
    from braindino.encoder import load_encoder
    from braindino.extract import extract_cohort

    encoder = load_encoder(args.model, device=args.device)
    _features, report = extract_cohort(encoder, args.manifest, args.out, batch_size=args.batch_size,
                                       workers=args.workers, patch_tokens=args.patch_tokens,
                                       slice_stride=args.slice_stride)
    where = f" (see {os.path.join(args.out, 'errors.csv')})" if report.errors else ""
    print(f"braindino extract: {report.summary()} -> {args.out}{where}")
    return 1 if report.errors else 0
