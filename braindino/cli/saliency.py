"""``braindino saliency``: CLS attention, attention rollout and probe-gradient maps as NIfTI in the input's native
voxel grid, with PNG montages (:func:`braindino.saliency.run_saliency`).

Exit status: 0 when every volume got its maps; 1 when some could not be read (one ``error:`` line each, the rest
are mapped); 2 when nothing was done (bad options, manifest or model).
"""

from braindino.cli.arguments import (add_encoder_arguments, add_endpoint_arguments, add_extraction_arguments,
                                     add_model_features, add_out)
from braindino.errors import InputError
from braindino.saliency.run import TASKS


def add_arguments(parser) -> None:
    from braindino.saliency.head_gradient import SUPPORTED_POOLINGS

    add_encoder_arguments(parser, baselines=False)
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="volume to map (NIfTI, DICOM folder, MHA, NRRD); repeatable")
    parser.add_argument("--manifest", metavar="CSV", help="cohort: its test rows are mapped when no --image is "
                        "given; with --task its training rows train the probe head")
    add_endpoint_arguments(parser, TASKS, poolings=SUPPORTED_POOLINGS, pooling="max", heads=("linear", "mlp"),
                           fusion=False, unit=False)
    parser.add_argument("--class", dest="class_name", metavar="NAME",
                        help="classification: map the evidence for this class (default: each volume's predicted "
                             "class)")
    parser.add_argument("--seed", type=int, default=0, help="head seed (default 0)")
    parser.add_argument("--no-montage", action="store_true", help="write the NIfTI maps only")
    add_extraction_arguments(parser, batch_size=32)
    add_model_features(parser, "OUT/features/<encoder>")
    add_out(parser, "DIR", "output folder: <volume>/*.nii.gz, <volume>/montage.png, saliency.csv")


def run(args) -> int:
    from braindino.saliency.run import run_saliency

    if args.sequences is not None and len(args.sequences) > 1:
        raise InputError("--sequences", f"a map reads one sequence, got {','.join(args.sequences)}",
                         "pass one, e.g. --sequences FLAIR")
    done = run_saliency(
        args.model, args.out, images=args.image, manifest=args.manifest, task=args.task, target=args.target,
        time=args.time, event=args.event, sequence=args.sequences[0] if args.sequences else None,
        pooling=args.pooling, head=args.head, class_name=args.class_name, seed=args.seed,
        montage=not args.no_montage, batch_size=args.batch_size, workers=args.workers, device=args.device,
        slice_stride=args.slice_stride, features=args.features)
    return 1 if done.failed else 0
