"""Read and preprocess one volume in a worker process, a bad file coming back as a value, never an exception.

``prepare`` (the slice store), ``extract`` (features) and ``robustness`` (perturbed test volumes) all read their
volumes through :func:`prepare_volume`, so a file that fails says the same thing in each, and their error tables
share :data:`ERROR_COLUMNS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from braindino.errors import InputError
from braindino.ingest.config import PreprocessConfig
from braindino.ingest.preprocess import PreprocessedVolume, preprocess_volume
from braindino.ingest.readers import Volume, load_volume

ERROR_COLUMNS = ["path", "subject", "sequence", "cause", "hint"]
UNEXPECTED_HINT = ("check that the file opens in an image viewer; if it does, report this error type to the "
                   "braindino maintainers")


@dataclass(frozen=True)
class VolumeFailure:
    """Why one volume could not be used: ``cause`` and ``hint``, each one line."""

    cause: str
    hint: str


def volume_failure(err: Exception) -> VolumeFailure:
    """``err`` as a failure value: an InputError's own cause and hint; anything ingest does not recognise (a reader
    or filter failing in its own way) as "unexpected error {Type}: {first line}"."""
    if isinstance(err, InputError):
        return VolumeFailure(err.cause, err.hint)
    lines = str(err).strip().splitlines()
    return VolumeFailure(f"unexpected error {type(err).__name__}" + (f": {lines[0]}" if lines else ""),
                         UNEXPECTED_HINT)


def prepare_volume(path, volume_index, config: PreprocessConfig, perturb=None
                   ) -> tuple[Volume, PreprocessedVolume] | VolumeFailure:
    """Load ``path`` (``volume_index`` of a 4D file, or None), apply ``perturb`` (``Volume -> Volume``, optional)
    and preprocess → (canonical Volume, its PreprocessedVolume), or the VolumeFailure that stopped it."""
    try:
        volume = load_volume(path, volume_index)
        if perturb is not None:
            volume = perturb(volume)
        return volume, preprocess_volume(volume, config)
    except Exception as err:
        return volume_failure(err)


def error_record(row: dict, failure: VolumeFailure) -> dict:
    """One row of an ``errors.csv`` (:data:`ERROR_COLUMNS`) for manifest ``row``."""
    return {"path": row["path"], "subject": row.get("subject", ""), "sequence": row.get("sequence", ""),
            "cause": failure.cause, "hint": failure.hint}
