"""Keep the image libraries' own console output off the console while a file is read.

nibabel logs through :mod:`logging` and ITK through its warning display (both switched off here). The codecs
inside GDCM (libjpeg, OpenJPEG, CharLS) write straight to file descriptor 2 from C, past Python's ``sys.stderr``;
:func:`library_output_captured` points that descriptor at a temporary file for the duration, so that what they say
can become part of the one error line of the file that made them say it (see
:func:`braindino.ingest.dicom.decoding_problem`) instead of stray lines between progress-bar updates.
"""

import contextlib
import logging
import os
import sys
import tempfile

import SimpleITK as sitk

MAX_CAPTURED_BYTES = 1 << 16


class CapturedOutput:
    """What the libraries wrote to file descriptor 2 so far (``text()``), read from the capture file."""

    def __init__(self, handle):
        self._handle = handle

    def text(self) -> str:
        sys.stderr.flush()
        # pread leaves the file offset alone: descriptor 2 shares it and keeps appending at the end
        return os.pread(self._handle.fileno(), MAX_CAPTURED_BYTES, 0).decode("utf-8", errors="replace")


@contextlib.contextmanager
def library_output_captured():
    """Silence nibabel's log and ITK's warning display, and capture file descriptor 2; yields a
    :class:`CapturedOutput`. Everything is restored on exit (also when the block raises)."""
    nibabel_log = logging.getLogger("nibabel")
    level, shown = nibabel_log.level, sitk.ProcessObject.GetGlobalWarningDisplay()
    nibabel_log.setLevel(logging.ERROR)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with tempfile.TemporaryFile() as handle, _fd2_into(handle):
            yield CapturedOutput(handle)
    finally:
        nibabel_log.setLevel(level)
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


@contextlib.contextmanager
def _fd2_into(handle):
    """Point file descriptor 2 at ``handle`` for the duration (Python's buffered stderr flushed first)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(handle.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
