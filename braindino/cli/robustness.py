"""``braindino robustness``: do an encoder's probe predictions survive what another scanner does to the images?
(:func:`braindino.robustness.run_robustness`)

Exit status: 0 when every condition was scored on every test volume; 1 when some volumes could not be embedded or
perturbed (one ``error:`` line each, ``RUN/errors.csv``; the rest is scored without them); 2 when nothing was done
(bad manifest, labels, options or model: one ``error:`` line); 130 when interrupted.
"""

from braindino.cli.arguments import (add_encoder_arguments, add_endpoint_arguments, add_extraction_arguments,
                                     add_out, add_protocol_arguments, comma_list)
from braindino.robustness.run import TASKS


def add_arguments(parser) -> None:
    from braindino.robustness.perturbations import PERTURBATION_ORDER, PERTURBATIONS

    grids = "; ".join(f"{name} ({p.parameter}: {', '.join(f'{v:g}' for v in p.severities)})"
                      for name, p in PERTURBATIONS.items())
    add_encoder_arguments(parser, several_models=True)
    parser.add_argument("--manifest", required=True, metavar="CSV", help="manifest: path, subject, optional "
                        "sequence, split (train/val → training, test → scored; else subject-grouped CV), labels")
    add_endpoint_arguments(parser, TASKS, task_required=True)
    parser.add_argument("--perturbations", type=comma_list(), metavar="LIST",
                        help=f"comma-separated, default all: {grids}")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                        help="replace a perturbation's severities, e.g. gibbs=0,0.2,0.4 (repeatable; the clean "
                             "severity is always added)")
    parser.add_argument("--perturbation-seed", type=int, default=0,
                        help="seed of the random parts of the perturbations (noise, bias-field shape); default 0")
    parser.add_argument("--metric", help="metric to report (default: the task's headline metric)")
    add_protocol_arguments(parser, seeds="0")
    add_extraction_arguments(parser)
    parser.add_argument("--features-root", metavar="DIR", help="folder of clean feature folders, one per encoder "
                        "(DIR/<encoder>/, e.g. a probe run's RUN/features): volumes already there with the same "
                        "settings are reused, the others added (default: RUN/features)")
    add_out(parser, "RUN", "run folder: robustness.csv, robustness.md, metrics.json, figures/, features/, errors.csv")
    parser.epilog = f"perturbations: {', '.join(PERTURBATION_ORDER)}"


def interrupted(args) -> str:
    return f"clean features so far are kept in {args.features_root or f'{args.out}/features'}"


def run(args) -> int:
    from braindino.robustness.run import run_robustness

    done = run_robustness(
        args.model, args.manifest, args.out, task=args.task, target=args.target, time=args.time, event=args.event,
        sequences=args.sequences, fusion=args.fusion, pooling=args.pooling, head=args.head, unit=args.unit,
        baselines=args.baseline, perturbations=args.perturbations, grid=args.grid,
        perturbation_seed=args.perturbation_seed, metric=args.metric, seeds=args.seeds, folds=args.folds,
        protocol=args.protocol, n_bootstrap=args.bootstrap, default_baselines=not args.no_default_baselines,
        workers=args.workers, batch_size=args.batch_size, slice_stride=args.slice_stride, device=args.device,
        features_root=args.features_root)
    return 1 if done.failed else 0
