"""``braindino probe`` / ``python probe.py``: does a frozen encoder predict my endpoint? Metrics with CIs, the same
splits for the model and its baselines, paired tests, ``metrics.json``, ``predictions.csv`` and ``report.md``
(:func:`braindino.probe.run_probe`).

Exit status: 0 when every endpoint was scored on every labelled subject; 1 when some volumes could not be embedded
(their subjects are left out, see ``RUN/features/<encoder>/errors.csv``); 2 when nothing was done (bad manifest,
labels, options or model: one ``error:`` line); 130 when interrupted.
"""

from braindino.cli.arguments import (add_encoder_arguments, add_endpoint_arguments, add_extraction_arguments,
                                     add_model_features, add_out, add_protocol_arguments, comma_list, positive_int)
from braindino.probe.results import TASKS


def add_arguments(parser) -> None:
    add_encoder_arguments(parser, scratch=True)
    parser.add_argument("--manifest", required=True, metavar="CSV", help="manifest: path, subject, optional "
                        "sequence, split (train/val/test; used when every row has one, else CV), label columns")
    add_endpoint_arguments(parser, TASKS)
    parser.add_argument("--mask", metavar="COL", default=None,
                        help="segmentation: column of label files on the image's voxel grid (default: mask)")
    parser.add_argument("--brain-age-correction", action="store_true",
                        help="regression: wrap the linear/MLP head in a brain-age bias correction fitted on the "
                             "training data only")
    parser.add_argument("--endpoints", metavar="YAML", help="several endpoints of this cohort: a list of {name, "
                        "task, target, time, event, mask, sequences, pooling, head, fusion, unit, "
                        "brain_age_correction}; the command line's values are their defaults")
    parser.add_argument("--skip-infeasible", action="store_true",
                        help="with several endpoints: skip (with one line each) those this cohort cannot support "
                             "(too few labelled subjects or classes) instead of stopping")
    parser.add_argument("--fractions", type=comma_list(float), default=[1.0, 10.0, 25.0, 50.0, 100.0],
                        metavar="LIST", help="training fractions in percent (default 1,10,25,50,100)")
    parser.add_argument("--shots", type=comma_list(int), default=None, metavar="LIST",
                        help="k-shot settings per class for classification (default 1,5 where every class has "
                             "enough training subjects; pass an empty string for none)")
    add_protocol_arguments(parser)
    add_training_arguments(parser)
    add_extraction_arguments(parser)
    add_model_features(parser, "extract into RUN/features/<encoder>/, reused on a rerun")
    add_out(parser, "RUN", "run folder for metrics.json, predictions.csv, report.md, figures/, features/, masks/, "
                           "attention/")


def add_training_arguments(parser) -> None:
    """The end-to-end rows: --finetune and how they and --baseline scratch train."""
    group = parser.add_argument_group("end-to-end rows (--baseline scratch, --finetune)")
    group.add_argument("--finetune", action="append", default=[], metavar="last:K|lora:R",
                       help="also fine-tune the model per training set, as its own row '<model> finetune SPEC': "
                            "last:K unfreezes the last K transformer blocks and the final norm, lora:R trains "
                            "rank-R LoRA adapters on every block's attention (the ViT's weights stay as they "
                            "are); repeatable")
    group.add_argument("--epochs", type=positive_int, default=30, metavar="N",
                       help="training epochs of the end-to-end rows at most (early stopping on 20%% of the training "
                            "subjects when there are at least 8; default 30)")
    group.add_argument("--max-slices", type=positive_int, default=16, metavar="N",
                       help="slices per volume the end-to-end rows train on, evenly spaced among the kept slices "
                            "after --slice-stride (default 16)")
    group.add_argument("--scratch-size", type=positive_int, default=64, metavar="PX",
                       help="slice size of the scratch CNN in pixels, at least 16 (default 64)")


def interrupted(args) -> str:
    return f"features extracted so far are kept in {args.out}/features; rerun to continue"


def run(args) -> int:
    from braindino.probe.run import run_probe

    done = run_probe(
        args.model, args.manifest, args.out, endpoints=args.endpoints, task=args.task, target=args.target,
        time=args.time, event=args.event, mask=args.mask, sequences=args.sequences, fusion=args.fusion,
        pooling=args.pooling, head=args.head, unit=args.unit, brain_age_correction=args.brain_age_correction,
        baselines=args.baseline, default_baselines=not args.no_default_baselines, fractions=args.fractions,
        shots=args.shots, seeds=args.seeds, folds=args.folds, protocol=args.protocol, n_bootstrap=args.bootstrap,
        features=args.features, skip_infeasible=args.skip_infeasible, workers=args.workers,
        batch_size=args.batch_size, slice_stride=args.slice_stride, device=args.device, finetune=args.finetune,
        epochs=args.epochs, max_slices=args.max_slices, scratch_size=args.scratch_size, command=args.command_line)
    return 1 if done.failed else 0
