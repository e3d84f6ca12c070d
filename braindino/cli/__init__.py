"""The ``braindino`` command: one subcommand per pipeline stage, each a thin module of this package over a plain
stage function. The only package that imports argparse.

A subcommand module exposes ``add_arguments(parser)``, ``run(args) -> int`` and optionally ``interrupted(args) ->
str`` (what is kept when Ctrl-C stops it); it is imported only when used, so ``braindino --help`` stays fast.
Every command runs inside the one error boundary of :mod:`.boundary` (exit 0 / 1 / 2 / 130, one ``error:`` line).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from braindino.cli.boundary import CommandParser, guarded

SUBCOMMANDS = {
    "synth": ("synth", "generate the embedded synthetic brain-MRI cohort (NIfTI + manifest.csv)"),
    "manifest": ("manifest", "write a manifest CSV from a BIDS dataset (anatomical images, participants.tsv "
                             "and sessions.tsv columns as labels)"),
    "prepare": ("prepare", "ingest a manifest's volumes into a memory-mapped slice store"),
    "train": ("train", "self-supervised pretraining (DINO/iBOT/KoLeo or SimCLR) on a slice store"),
    "export": ("export", "export a training checkpoint's backbone as a timm local-dir model folder"),
    "extract": ("extract", "embed a manifest's volumes with a frozen encoder into a features folder"),
    "probe": ("probe", "probe a frozen encoder on labelled endpoints: metrics with CIs, baselines on the same "
                       "splits, report"),
    "robustness": ("robustness", "score probe heads trained on clean volumes on perturbed test volumes (contrast, "
                                 "bias field, Gibbs, noise, ghosting, thick slices): metric and drop from clean per "
                                 "severity and encoder"),
    "saliency": ("saliency", "CLS attention, attention rollout and probe-gradient maps as NIfTI in the input's "
                             "native voxel grid, with PNG montages"),
    "demo": ("demo", "run the main job end to end on the embedded synthetic cohort"),
    "configs": ("configs", "list the shipped training configs (use a name as `train --config NAME`)"),
}


class VersionAction(argparse.Action):
    """``--version``: braindino's version, the git commit of a clone, torch / timm / Python versions; then exit."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from braindino.version import version_line

        print(version_line())
        parser.exit()


def command_module(name: str):
    """The module of subcommand ``name`` (``braindino.cli.<module>``)."""
    return importlib.import_module(f"braindino.cli.{SUBCOMMANDS[name][0]}")


def build_parser(argv) -> argparse.ArgumentParser:
    parser = CommandParser(prog="braindino", description="Brain-MRI foundation models: slice-wise "
                           "self-distillation, feature extraction and probing.")
    parser.add_argument("--version", action=VersionAction, help="show the version (and git commit, library "
                                                                "versions) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            module = command_module(name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(module=module)
    return parser


def tolerate_any_terminal_encoding() -> None:
    """A terminal that cannot show a character (e.g. an ASCII locale) must not turn a message into a crash."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def run_parsed(module, args: argparse.Namespace) -> int:
    """Run a parsed command through the error boundary, its ``--out`` checked first."""
    from braindino.cli.arguments import check_writable_folder

    def run(parsed) -> int:
        if getattr(parsed, "out", None) is not None:
            check_writable_folder(parsed.out)
        return module.run(parsed)

    interrupted = module.interrupted(args) if hasattr(module, "interrupted") else ""
    return guarded(run, args, interrupted)


def main(argv=None) -> int:
    tolerate_any_terminal_encoding()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    args.command_line = shlex.join(["braindino", *argv])    # what a run records as its command (report, metrics)
    return run_parsed(args.module, args)


def standalone(prog: str, name: str, argv=None) -> int:
    """``python probe.py`` / ``python train_dino.py``: subcommand ``name`` as a program of its own."""
    tolerate_any_terminal_encoding()
    module = command_module(name)
    parser = CommandParser(prog=prog, description=(module.__doc__ or "").split("\n\n")[0])
    module.add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join([prog, *argv])
    return run_parsed(module, args)
