"""Does a frozen encoder predict my endpoint? ``python probe.py --model MODEL --manifest CSV --task TASK
--target COL --out RUN`` (same as ``braindino probe``); see ``python probe.py --help``."""

import sys

from braindino.cli import standalone


def main(argv=None) -> int:
    return standalone("probe.py", "probe", argv)


if __name__ == "__main__":
    sys.exit(main())
