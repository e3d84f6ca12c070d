"""The manifest: a CSV with one row per input volume.

Required columns: ``path`` (image file or DICOM folder; relative paths resolve against the manifest's folder) and
``subject``. Optional: ``sequence`` (e.g. T1, FLAIR; a multi-sequence subject is several rows), ``split``
(``train``/``val``/``test``, empty = unassigned) and ``volume_index`` (which volume of a 4D image). Every other
column is a label carried through unchanged, except that ``mask`` (a segmentation label file of the volume), when
present, is a path resolved like ``path`` (an empty cell stays empty). Rows are numbered as in a spreadsheet: the header is row 1, so the
DataFrame row with index ``i`` is manifest row ``i + 2``.
"""

import os
import warnings
from pathlib import Path

import pandas as pd

from braindino.errors import InputError

REQUIRED_COLUMNS = ("path", "subject")
STANDARD_COLUMNS = ("path", "subject", "sequence", "split", "volume_index")
TEXT_COLUMNS = ("path", "subject", "sequence", "split")
PATH_LABEL_COLUMNS = ("mask",)          # label columns holding file paths, resolved like ``path``
SPLITS = ("train", "val", "test")
FIRST_DATA_ROW = 2
ROWS_SHOWN = 5


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a manifest CSV.

    Returns a DataFrame with a 0..n-1 index and the columns ``path`` (absolute path, str), ``subject`` (str),
    ``sequence`` (str, ``""`` when absent), ``split`` (``"train"``/``"val"``/``"test"`` or ``""``), ``volume_index``
    (pandas ``Int64``, ``<NA>`` when empty), then the label columns in file order. ``df.attrs["manifest_path"]`` holds
    the manifest's absolute path. A ``mask`` label column holds absolute paths (``""`` where empty). Raises :class:`InputError` naming the manifest (and rows) for every problem.
    """
    manifest_path = Path(os.path.abspath(path))
    table = _read_csv(manifest_path)
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise InputError(manifest_path, f"missing required column(s) {', '.join(missing)} "
                                        f"(found: {', '.join(map(str, table.columns)) or 'none'})",
                         "add a header row with at least the columns path,subject")
    if len(table) == 0:
        raise InputError(manifest_path, "manifest has a header but no rows", "add one row per volume")

    for column in TEXT_COLUMNS:
        values = table[column] if column in table.columns else pd.Series("", index=table.index)
        table[column] = values.fillna("").astype(str).str.strip()
    for column in REQUIRED_COLUMNS:
        _reject_rows(manifest_path, table[column] == "", f"empty {column}", f"fill in the {column} of every row")
    table["split"] = table["split"].str.lower()
    _reject_rows(manifest_path, ~table["split"].isin(("", *SPLITS)), "split not one of train/val/test",
                 "use train, val or test (or leave the cell empty)")
    table["volume_index"] = _parse_volume_index(manifest_path, table.get("volume_index"), table.index)
    table["path"] = [_resolve(manifest_path.parent, value) for value in table["path"]]
    for column in PATH_LABEL_COLUMNS:
        if column in table.columns:
            table[column] = [_resolve(manifest_path.parent, value) if value else ""
                             for value in table[column].fillna("").astype(str).str.strip()]

    ordered = list(STANDARD_COLUMNS) + [c for c in table.columns if c not in STANDARD_COLUMNS]
    manifest = table[ordered].reset_index(drop=True)
    manifest.attrs["manifest_path"] = str(manifest_path)
    return manifest


def find_duplicate_rows(df: pd.DataFrame) -> list[int]:
    """Index labels of rows whose (resolved path, volume_index) already appeared in an earlier row."""
    return [index for index, _first in _duplicate_pairs(df)]


def assert_no_duplicate_rows(df: pd.DataFrame) -> None:
    """Raise InputError naming the manifest and the rows (spreadsheet numbering) that repeat a volume."""
    pairs = _duplicate_pairs(df)
    if pairs:
        shown = "; ".join(f"row {index + FIRST_DATA_ROW} repeats row {first + FIRST_DATA_ROW}"
                          for index, first in pairs[:ROWS_SHOWN])
        more = f" and {len(pairs) - ROWS_SHOWN} more" if len(pairs) > ROWS_SHOWN else ""
        raise InputError(df.attrs.get("manifest_path", "manifest"),
                         f"same path and volume_index listed twice ({shown}{more})", "remove the repeated rows")


def label_columns(df: pd.DataFrame) -> list[str]:
    """The label columns: every column that is not one of path/subject/sequence/split/volume_index."""
    return [column for column in df.columns if column not in STANDARD_COLUMNS]


def _read_csv(manifest_path: Path) -> pd.DataFrame:
    if not manifest_path.is_file():
        raise InputError(manifest_path, "manifest not found" if not manifest_path.exists() else "not a file",
                         "pass the path of the manifest CSV file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            table = pd.read_csv(manifest_path, dtype={c: str for c in (*TEXT_COLUMNS, *PATH_LABEL_COLUMNS,
                                                                         "volume_index")},
                                index_col=False, skipinitialspace=True, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise InputError(manifest_path, "manifest is empty", "write a header row path,subject,... and one row "
                                                              "per volume") from None
    except UnicodeDecodeError:
        raise InputError(manifest_path, "manifest is not UTF-8 text", "save it as a UTF-8 CSV file") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning) as error:
        detail = str(error).strip().splitlines()[0]
        raise InputError(manifest_path, f"not a readable CSV ({detail})",
                         "make every row have the same number of comma-separated fields as the header") from None
    except OSError as error:
        raise InputError(manifest_path, f"cannot read manifest ({error.strerror or error})",
                         "check the file permissions") from None
    table.columns = [str(column).strip() for column in table.columns]
    return table


def _parse_volume_index(manifest_path: Path, column: pd.Series | None, index: pd.Index) -> pd.Series:
    """Parse the optional ``volume_index`` column into non-negative ``Int64`` values (``<NA>`` where empty)."""
    if column is None:
        return pd.Series(pd.NA, index=index, dtype="Int64")
    text = column.fillna("").astype(str).str.strip()
    numbers = pd.to_numeric(text.where(text != ""), errors="coerce")
    invalid = (text != "") & (numbers.isna() | (numbers < 0) | (numbers % 1 != 0))
    _reject_rows(manifest_path, invalid, "volume_index is not a non-negative integer",
                 "use 0, 1, 2, ... (or leave it empty for 3D images)")
    return numbers.astype("Int64")


def _reject_rows(manifest_path: Path, bad: pd.Series, problem: str, hint: str) -> None:
    """Raise InputError listing the spreadsheet row numbers where ``bad`` [n_rows] bool is True."""
    rows = [int(i) + FIRST_DATA_ROW for i in bad[bad].index]
    if rows:
        shown = ", ".join(map(str, rows[:ROWS_SHOWN])) + (f" and {len(rows) - ROWS_SHOWN} more"
                                                           if len(rows) > ROWS_SHOWN else "")
        raise InputError(manifest_path, f"{problem} in row{'s' if len(rows) > 1 else ''} {shown} "
                                        f"(the header is row 1)", hint)


def _resolve(manifest_folder: Path, value: str) -> str:
    candidate = Path(os.path.expanduser(value))
    return os.path.abspath(candidate if candidate.is_absolute() else manifest_folder / candidate)


def _duplicate_pairs(df: pd.DataFrame) -> list[tuple[int, int]]:
    """(index, index of first occurrence) for every row repeating an earlier (real path, volume_index)."""
    indices = df["volume_index"] if "volume_index" in df.columns else pd.Series(pd.NA, index=df.index)
    first_seen: dict[tuple[str, object], int] = {}
    pairs = []
    for index, path, volume_index in zip(df.index, df["path"], indices):
        key = (os.path.realpath(path), None if pd.isna(volume_index) else int(volume_index))
        if key in first_seen:
            pairs.append((int(index), first_seen[key]))
        else:
            first_seen[key] = int(index)
    return pairs
