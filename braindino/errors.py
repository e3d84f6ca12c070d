"""The exception types a user sees, and the one helper every command uses to print an error as one line.

``InputError``: a bad input file (which file, what is wrong, what to do). ``OutputError``: an output could not be
written (full disk, quota, permissions) — which folder, how much space was needed, what was kept.
``error_line(err)`` turns any exception into the line a command prints after ``error:``; an exception re-raised by
torch from a DataLoader worker process is unwrapped to the worker's own one-line cause.
"""

import errno as errno_codes
import os
import re
import shutil


class InputError(Exception):
    """A problem with one input file (or manifest) that the user can fix.

    ``str(err)`` is a single line: ``"{path}: {cause} — {hint}"``. It never contains DICOM header fields.
    """

    def __init__(self, path, cause: str, hint: str):
        self.path = str(path)
        self.cause = cause
        self.hint = hint
        super().__init__(f"{self.path}: {cause} — {hint}")


class OutputError(OSError):
    """Writing into ``folder`` failed; ``str(err)`` is one line ``"{folder}: {cause} — {hint}"``.

    An ``OSError`` (``errno`` is the failed write's, e.g. ``ENOSPC``), so code that handles write errors catches it.
    """

    def __init__(self, folder, cause: str, hint: str, errno: int | None = None):
        super().__init__(errno, cause)
        self.folder, self.cause, self.hint = str(folder), cause, hint

    def __str__(self) -> str:
        return f"{self.folder}: {self.cause} — {self.hint}"


_SPACE_ERRORS = {errno_codes.ENOSPC: "no space left on device", errno_codes.EDQUOT: "disk quota exceeded"}
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def free_bytes(folder) -> int | None:
    """Free space for an unprivileged writer in ``folder`` (or its nearest existing parent); None if unknown."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def os_error_of(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err``: itself, one in its cause/context chain, or an ``(os error N)`` /
    ``[Errno N]`` in its text (torch and safetensors turn a failed write into RuntimeError / SafetensorError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        match = _OS_ERROR_IN_TEXT.search(str(err))
        if match:
            code = int(match.group(1) or match.group(2))
            return OSError(code, os.strerror(code))
        err = err.__cause__ or err.__context__
    return None


def write_error(err: BaseException, folder, writing: str, needed_bytes: int | None = None,
                kept: str = "") -> OutputError:
    """One-line ``OutputError`` for a failed write into ``folder`` of ``writing`` (e.g. "step-00000010.pt").

    A full disk or quota names the space needed (when known) and free; ``kept`` says what is still intact.
    """
    if isinstance(err, OutputError):
        return err
    os_error = os_error_of(err) or OSError(None, str(err).splitlines()[0] if str(err) else type(err).__name__)
    code = os_error.errno
    if code in _SPACE_ERRORS:
        free = free_bytes(folder)
        amounts = [f"needs about {format_bytes(needed_bytes)}" if needed_bytes else "",
                   f"{format_bytes(free)} free" if free is not None else ""]
        amounts = ", ".join(a for a in amounts if a)
        cause = f"{_SPACE_ERRORS[code]} while writing {writing}" + (f" ({amounts})" if amounts else "")
        hint = "free some space (or choose another folder) and run the command again"
    else:
        cause = f"cannot write {writing}: {os_error.strerror or os_error}"
        hint = "check that the folder exists and is writable, and that the disk has space"
    return OutputError(folder, cause, f"{hint}; {kept}" if kept else hint, code)


_WORKER_HEADER = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.")


def worker_cause(err: BaseException) -> str | None:
    """The original one-line message of an exception torch re-raised from a DataLoader worker, else None.

    Torch re-raises it as ``Caught {Type} in DataLoader worker process N.`` followed by the worker's formatted
    traceback, whose last exception line is ``[module.]Type: message``.
    """
    text = str(err)
    header = _WORKER_HEADER.search(text)
    if header is None or "Original Traceback" not in text:
        return None
    name = re.escape(header.group(1))
    lines = re.findall(rf"^(?:[\w.]+\.)?{name}: (.*)$", text, flags=re.MULTILINE)
    return lines[-1].strip() if lines else f"{header.group(1)} in a DataLoader worker process"


def error_line(err: BaseException) -> str:
    """The one line a command prints for ``err`` (after ``error: ``)."""
    cause = worker_cause(err)
    if cause is not None:
        return cause
    if isinstance(err, (InputError, OutputError)):
        return str(err)
    if isinstance(err, OSError) and err.strerror:
        where = err.filename if err.filename is not None else ""
        return f"{where}: {err.strerror}" if where else err.strerror
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
