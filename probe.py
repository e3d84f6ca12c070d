"""Does a frozen encoder predict my endpoint? ``python probe.py --model MODEL --manifest CSV --task TASK
--target COL --out RUN`` (same as ``braindino probe``); see ``python probe.py --help``."""

import argparse
import shlex
import sys

from braindino.cli import tolerate_any_terminal_encoding
from braindino.probe import command


def main(argv=None) -> int:
    tolerate_any_terminal_encoding()
    parser = argparse.ArgumentParser(prog="probe.py", description=command.__doc__.split("\n\n")[0])
    command.add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["probe.py", *argv])
    return command.run(args)


if __name__ == "__main__":
    sys.exit(main())
