"""``braindino manifest``: write a manifest CSV from a BIDS dataset (:func:`braindino.bids.write_bids_manifest`):
one row per anatomical image (``sub-*/[ses-*/]anat/*.nii[.gz]``), the BIDS suffix as ``sequence``, the columns of
participants.tsv and sessions.tsv as labels; derivatives/, sourcedata/ and code/ are skipped.

Exit status: 0 when the manifest was written, 2 when nothing could be done (not a BIDS folder, no anatomical
images, an unusable participants.tsv / sessions.tsv, an unwritable --out).
"""

import os


def add_arguments(parser) -> None:
    parser.add_argument("--bids", required=True, metavar="DIR",
                        help="top folder of a BIDS dataset (holding participants.tsv and sub-*/)")
    parser.add_argument("--out", dest="csv", required=True, metavar="CSV",
                        help="manifest CSV to write (replaced if it exists); its paths are relative to its folder")


def run(args) -> int:
    from braindino.bids import write_bids_manifest
    from braindino.cli.arguments import check_writable_folder
    from braindino.errors import InputError

    if os.path.isdir(args.csv):
        raise InputError(args.csv, "--out is a folder", "give the path of the manifest CSV file to write")
    check_writable_folder(os.path.dirname(os.path.abspath(args.csv)))
    table = write_bids_manifest(args.bids, args.csv)
    sequences = ", ".join(f"{count} {name}" for name, count in table["sequence"].value_counts().sort_index().items())
    print(f"braindino manifest: {len(table)} images of {table['subject'].nunique()} subjects ({sequences}) -> "
          f"{args.csv}")
    return 0
