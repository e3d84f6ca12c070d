"""A manifest from a BIDS dataset: one row per anatomical image, participants' and sessions' columns as labels.

Walked (no pybids): ``DIR/sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>][_<key>-<value>...]_<suffix>
.nii[.gz]``. Only the ``sub-*`` folders at the top of ``DIR`` are read, so ``derivatives/``, ``sourcedata/`` and
``code/`` are skipped, and so is every file or folder whose name starts with a dot. Skipped as well: defacing
masks (suffix ``defacemask``) and files whose name does not start with their folder's ``sub-`` label.

Columns: ``path`` (relative to the manifest's folder), ``subject`` (``sub-<label>``, as in participants.tsv's
``participant_id``), ``sequence`` (the BIDS suffix: T1w, T2w, FLAIR, T2starw, PDw, ...), ``session``, ``run`` and
``acq`` (the entity values without their key: ``ses-01`` -> ``01``; empty where a file has none), any other entity
a file has (``ce``, ``rec``, ``echo``, ``part``, ...) under its key, then the columns of ``participants.tsv``
(joined on ``participant_id``) and of each ``sub-<label>/sub-<label>_sessions.tsv`` (joined on ``session_id``;
a session's value wins over a participant's of the same name). BIDS's missing value ``n/a`` becomes an empty cell.
"""

import os
from pathlib import Path

import pandas as pd

from braindino.atomic import atomic_path
from braindino.errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii")
SKIPPED_SUFFIXES = ("defacemask",)
MISSING = "n/a"
ENTITY_COLUMNS = {"ses": "session", "run": "run", "acq": "acq"}
RESERVED = ("path", "subject", "sequence", "volume_index")   # label columns that would clash with the manifest's


def bids_manifest(root, manifest_folder) -> pd.DataFrame:
    """The manifest table of the BIDS dataset at ``root`` (paths relative to ``manifest_folder``), rows sorted by
    subject, session and file name. Raises :class:`InputError` when ``root`` is not a BIDS dataset with
    anatomical images or one of its TSV files cannot be used."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "BIDS folder not found" if not root.exists() else "not a folder",
                         "pass the top folder of the BIDS dataset (the one holding participants.tsv)")
    subjects = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-"))
    if not subjects:
        raise InputError(root, "no sub-* folders: not the top folder of a BIDS dataset",
                         "pass the folder holding dataset_description.json, participants.tsv and sub-*/")
    rows = [row for subject in subjects for row in _subject_rows(subject, Path(manifest_folder))]
    if not rows:
        raise InputError(root, "no anatomical images (sub-*/[ses-*/]anat/*.nii[.gz])",
                         "check that this is a BIDS dataset with anatomical scans")
    table = pd.DataFrame(rows).fillna("")
    image_columns = list(table.columns)
    participants = _labels(root / "participants.tsv", "participant_id", image_columns)
    if participants is not None:
        table = table.merge(participants, on="subject", how="left")
    sessions = [_labels(s / f"{s.name}_sessions.tsv", "session_id", image_columns, s.name) for s in subjects]
    sessions = [s for s in sessions if s is not None]
    if sessions:
        order = list(table.columns)
        by_session = pd.concat(sessions, ignore_index=True).fillna("")
        order += [c for c in by_session.columns if c not in order]
        table = table.merge(by_session, on=["subject", "session"], how="left", suffixes=("_participant", ""))
        for column in [c for c in by_session.columns if f"{c}_participant" in table.columns]:
            value = table[column].fillna("")
            table[column] = value.where(value != "", table.pop(f"{column}_participant"))
        table = table[order]
    return table.fillna("").sort_values(["subject", "session", "path"], kind="stable").reset_index(drop=True)


def write_bids_manifest(root, out) -> pd.DataFrame:
    """Write :func:`bids_manifest` of ``root`` to the CSV ``out`` (atomically) and return it."""
    out = Path(os.path.abspath(out))
    table = bids_manifest(root, out.parent)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    return table


def _subject_rows(subject: Path, manifest_folder: Path) -> list[dict]:
    """One dict per anatomical image of the subject folder ``subject`` (with and without session folders)."""
    folders = [subject / "anat"] + sorted(p / "anat" for p in subject.iterdir()
                                          if p.is_dir() and p.name.startswith("ses-"))
    rows = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for image in sorted(folder.iterdir()):
            name = image.name
            if name.startswith(".") or not image.is_file() or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            if not name.startswith(f"{subject.name}_"):
                continue
            stem = name[:-len(next(s for s in IMAGE_SUFFIXES if name.lower().endswith(s)))]
            *pairs, suffix = stem.split("_")
            if suffix in SKIPPED_SUFFIXES or "-" in suffix:
                continue
            entities = dict(pair.split("-", 1) for pair in pairs if "-" in pair)
            row = {"path": os.path.relpath(image, manifest_folder), "subject": subject.name, "sequence": suffix,
                   **{column: entities.get(key, "") for key, column in ENTITY_COLUMNS.items()}}
            row.update({key: value for key, value in entities.items() if key != "sub" and key not in ENTITY_COLUMNS})
            rows.append(row)
    return rows


def _labels(path: Path, id_column: str, image_columns: list[str], subject: str | None = None
            ) -> pd.DataFrame | None:
    """The TSV ``path`` as a label table (None when the file does not exist) keyed by ``subject`` (from
    ``id_column``: participants.tsv) or by ``subject`` and ``session`` (``subject`` given, ``id_column``'s
    ``ses-01`` -> ``01``: a sessions file); ``n/a`` becomes an empty cell. A column named like one of ``image_columns`` (path, entities, ...) or listed twice is refused."""
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(path, f"not a readable tab-separated table ({detail})",
                         "fix the file (one header row, tab-separated values)") from None
    table.columns = [str(c).strip() for c in table.columns]
    if id_column not in table.columns:
        raise InputError(path, f"has no {id_column} column (found: {', '.join(table.columns) or 'none'})",
                         f"add the {id_column} column BIDS requires")
    clashes = [c for c in table.columns if c != id_column and (c in RESERVED or c in image_columns)]
    if clashes:
        raise InputError(path, f"column(s) {', '.join(clashes)} would clash with the manifest's own columns",
                         "rename those columns")
    table = table.apply(lambda column: column.str.strip().replace(MISSING, ""))
    repeated = sorted(set(table[id_column][table[id_column].duplicated()]))
    if repeated:
        raise InputError(path, f"{id_column} {', '.join(repeated[:5])} listed more than once",
                         "keep one row per id")
    ids = table.pop(id_column)
    if subject is None:
        table.insert(0, "subject", ids)
    else:
        table.insert(0, "subject", subject)
        table.insert(1, "session", ids.str.removeprefix("ses-"))
    return table
