"""Does a frozen encoder predict my endpoint? ``python probe.py --model MODEL --manifest CSV --task TASK
--target COL --out RUN`` (same as ``braindino probe``); see ``python probe.py --help``."""

import argparse
import sys

from braindino.cli import tolerate_any_terminal_encoding
from braindino.probe import command


def main(argv=None) -> int:
    tolerate_any_terminal_encoding()
    parser = argparse.ArgumentParser(prog="probe.py", description=command.__doc__.split("\n\n")[0])
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
