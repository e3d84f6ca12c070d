"""The ``braindino`` command: one subcommand per pipeline stage, each in its own module.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when used,
so ``braindino --help`` stays fast.
"""

import argparse
import importlib
import shlex
import sys

SUBCOMMANDS = {
    "synth": ("braindino.synth.command", "generate the embedded synthetic brain-MRI cohort (NIfTI + manifest.csv)"),
    "prepare": ("braindino.store.command", "ingest a manifest's volumes into a memory-mapped slice store"),
    "train": ("braindino.train.command", "self-supervised pretraining (DINO/iBOT/KoLeo or SimCLR) on a slice store"),
    "export": ("braindino.encoder.command", "export a training checkpoint's backbone as a timm local-dir model folder"),
    "extract": ("braindino.extract.command", "embed a manifest's volumes with a frozen encoder into a features folder"),
    "probe": ("braindino.probe.command", "probe a frozen encoder on labelled endpoints: metrics with CIs, "
                                         "baselines on the same splits, report"),
    "robustness": ("braindino.robustness.command", "score probe heads trained on clean volumes on perturbed test "
                                                   "volumes (contrast, bias field, Gibbs, noise, ghosting, thick "
                                                   "slices): metric and drop from clean per severity and encoder"),
    "saliency": ("braindino.saliency.command", "CLS attention, attention rollout and probe-gradient maps as NIfTI in "
                                               "the input's native voxel grid, with PNG montages"),
    "demo": ("braindino.demo", "run the main job end to end on the embedded synthetic cohort"),
    "configs": ("braindino.train.catalog", "list the shipped training configs (use a name as `train --config NAME`)"),
}


class VersionAction(argparse.Action):
    """``--version``: braindino's version, the git commit of a clone, torch / timm / Python versions; then exit."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from braindino.version import version_line

        print(version_line())
        parser.exit()


def positive_int(text: str) -> int:
    """argparse ``type`` for counts that must be at least 1 (subjects, workers, slice stride)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser(argv) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="braindino", description="Brain-MRI foundation models: "
                                     "slice-wise self-distillation, feature extraction and probing.")
    parser.add_argument("--version", action=VersionAction, help="show the version (and git commit, library "
                                                                "versions) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(run=module.run)
    return parser


def tolerate_any_terminal_encoding() -> None:
    """A terminal that cannot show a character (e.g. an ASCII locale) must not turn a message into a crash."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv=None) -> int:
    tolerate_any_terminal_encoding()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    args.command_line = shlex.join(["braindino", *argv])    # what a run records as its command (report, metrics)
    try:
        return int(args.run(args))
    except Exception as err:   # an error re-raised from a DataLoader worker: print its own one-line cause
        from braindino.errors import worker_cause

        cause = worker_cause(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
