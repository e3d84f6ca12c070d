"""Atomic file output: write to a temporary sibling, then rename over the final name.

An interrupted run therefore never leaves a half-written file under a final name, and a failed write (a full
disk, say) leaves no temporary file behind and raises a one-line :class:`~braindino.errors.OutputError` naming the
folder and, when the caller knows it, the space the file needed.
"""

import contextlib
import json
import os
import tempfile
from pathlib import Path

from braindino.errors import InputError, os_error_of, write_error


@contextlib.contextmanager
def atomic_path(final_path, needed_bytes: int | None = None, kept: str = ""):
    """Yield a temporary path beside ``final_path``; rename it into place on success, delete it on error.

    A write that fails for an operating-system reason (full disk, quota, permissions; also when torch or
    safetensors wrap it in their own exception type) is raised as ``OutputError``, whose line names the folder,
    ``needed_bytes`` (the file's approximate size, when given) and ``kept`` (what is still intact).
    """
    final_path = Path(final_path)
    try:
        final_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final_path.parent, prefix=f".{final_path.name}.", suffix=".tmp")
    except OSError as err:
        raise write_error(err, final_path.parent, final_path.name, needed_bytes, kept) from err
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_current_umask())   # mkstemp makes 0600; give the file the permissions open() would
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as written:   # durable before it becomes visible: a crash never leaves a torn file
            os.fsync(written.fileno())
        os.replace(tmp, final_path)
        _fsync_directory(final_path.parent)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, Exception) and not isinstance(err, InputError) and os_error_of(err) is not None:
            raise write_error(err, final_path.parent, final_path.name, needed_bytes, kept) from err
        raise


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
