"""The one error boundary of every ``braindino`` command, and the parser that reports a bad option the same way.

Exit status, for every command: 0 done; 1 some items failed (the command's ``run`` returns it, or raises
:class:`RunFailed`; an error re-raised from a DataLoader worker or a dead worker process is 1 too); 2 nothing was
done — bad input or an unusable option (:class:`~braindino.errors.InputError`, an ``OSError`` such as an unwritable
folder or a full disk, a bad option value); 130 interrupted. Every error is one line ``error: ...`` on stderr
(:func:`~braindino.errors.error_line`), never a traceback; a real bug still raises.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures.process import BrokenProcessPool

from braindino.errors import InputError, error_line, worker_cause

FAILED, UNUSABLE, INTERRUPTED = 1, 2, 130


class RunFailed(Exception):
    """Raised by a command's ``run`` when its work started and failed (exit 1, not 2): ``cause`` is the error."""

    def __init__(self, cause: BaseException):
        super().__init__(error_line(cause))
        self.cause = cause


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are the boundary's: one ``error:`` line naming the option, exit 2."""

    def error(self, message: str):
        self.exit(UNUSABLE, f"error: {message} (see {self.prog} --help)\n")


def _say(text: str) -> None:
    print(f"error: {text}", file=sys.stderr)


def guarded(run, args: argparse.Namespace, interrupted: str = "") -> int:
    """``run(args)`` → its exit status, with every error turned into one line and the status above.
    ``interrupted``: what the command keeps when stopped by Ctrl-C (appended to the interrupted line)."""
    try:
        return int(run(args))
    except KeyboardInterrupt:
        _say("interrupted" + (f" — {interrupted}" if interrupted else ""))
        return INTERRUPTED
    except RunFailed as err:
        _say(str(err))
        return FAILED
    except BrokenProcessPool:
        _say(f"a worker process died (out of memory?){' — ' + interrupted if interrupted else ''}; rerun with "
             "fewer --workers to continue")
        return FAILED
    except Exception as err:
        cause = worker_cause(err)
        if cause is not None:
            _say(cause)
            return FAILED
        if isinstance(err, (InputError, OSError)):
            _say(error_line(err))
            return UNUSABLE
        raise
