"""Read DICOM: a folder holding one series of single-frame files, or one multi-frame (enhanced) file.

Every SimpleITK/GDCM call runs inside :func:`braindino.ingest.quiet.library_output_captured` and is wrapped: a
file GDCM cannot parse becomes one :class:`InputError` naming the folder and, where known, the file, never a
library's exception text (which quotes its build paths). What the codecs print (libjpeg's "Unsupported JPEG data
precision 12", OpenJPEG's marker errors) turns the volume's read into a failure that says which compression could
not be decoded (:func:`decoding_problem`): the pixels GDCM returns after such a message are not the image.

Refused rather than misread: Siemens mosaics (ImageType MOSAIC or a CSA image header counting mosaic tiles: each
file is a whole volume tiled into one 2D image) and folders of several multi-frame files (each a whole volume);
slices at missing, duplicate or uneven positions. Messages never quote DICOM header fields.
"""

import base64
import re
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

with warnings.catch_warnings():   # nibabel.nicom warns on import that its own DICOM readers are experimental
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader

from braindino.errors import InputError
from braindino.ingest.quiet import library_output_captured
from braindino.ingest.raw import STACK_HINT, RawImage, check_volume_index, itk_to_raw, trim_trailing_singletons

DICOM_SUFFIXES = (".dcm", ".ima")
IMAGE_TYPE_TAG = "0008|0008"            # ImageType: ORIGINAL\PRIMARY\M\ND\MOSAIC for a Siemens mosaic
NUMBER_OF_FRAMES_TAG = "0028|0008"
CSA_IMAGE_HEADER_TAG = "0029|1010"      # Siemens CSA image header (base64 in ITK's metadata)
IMAGE_POSITION_TAG = "0020|0032"        # ImagePositionPatient: x\y\z of the slice's first voxel, mm (LPS)
IMAGE_ORIENTATION_TAG = "0020|0037"     # ImageOrientationPatient: row and column direction cosines
SLICE_GAP_TOLERANCE = 0.1               # a slice gap may differ from the median gap by this share
SAME_POSITION_MM = 1e-3                 # two slices closer than this along the normal share one position
DICOM_MAGIC_OFFSET = 128                # "DICM" follows a 128-byte preamble in a DICOM Part 10 file
DICOM_UNREADABLE = "DICOM series cannot be read (damaged files or inconsistent slice geometry)"
DICOM_REEXPORT_HINT = "re-export the series, or convert it to NIfTI with dcm2niix"
MOSAIC_HINT = ("convert the series to NIfTI with dcm2niix (it unpacks mosaics into 3D volumes) and list the NIfTI "
               "file in the manifest")
DECODE_HINT = ("convert the files to NIfTI with dcm2niix, or re-export them uncompressed (explicit VR little "
               "endian) from the scanner or PACS")
_JPEG_PRECISION = re.compile(r"Unsupported JPEG data precision (\d+)")
_JPEG2000_WORDS = ("jpeg2000", "jpeg 2000", "j2k", "openjpeg", "opj_", "tile", "marker", "codestream")


def read_dicom_folder(path: Path, volume_index) -> RawImage:
    """The one series in folder ``path`` as a :class:`RawImage`; a one-file series is read as a (multi-frame) file."""
    if not any(path.iterdir()):
        raise InputError(path, "DICOM folder is empty", "point the manifest at the folder that holds the .dcm files")
    with library_output_captured() as output:
        series_ids = _call(lambda: sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)), path, output,
                           lambda: _unparseable_member(path))
        if len(series_ids) == 0:
            _raise_if_undecodable(path, output.text())
            raise InputError(path, "folder holds no readable DICOM series",
                             "point the manifest at a folder of DICOM slice files (or at an image file)")
        if len(series_ids) > 1:
            raise InputError(path, f"folder holds {len(series_ids)} DICOM series",
                             "move each series into its own folder and list each folder as a manifest row")
        file_names = _call(lambda: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series_ids[0]), path,
                           output, lambda: _unparseable_member(path))
        if len(file_names) == 1:
            return _read_file(path, Path(file_names[0]), volume_index, output)
        check_volume_index(path, None, volume_index)
        _check_series_headers(path, file_names, output)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(file_names)
        image = _call(reader.Execute, path, output, cause=DICOM_UNREADABLE)
        _raise_if_undecodable(path, output.text())
        return _single_volume(path, image, "DICOM series")


def read_dicom_file(path: Path, volume_index) -> RawImage:
    """One DICOM file: an enhanced (multi-frame) file holding a 3D volume, or a single frame (refused as 2D)."""
    with library_output_captured() as output:
        return _read_file(path, path, volume_index, output)


def decoding_problem(text: str) -> str | None:
    """The cause to report for codec messages ``text`` captured while reading (None when nothing was said)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    precision = _JPEG_PRECISION.search(text)
    if precision:
        what = f"{precision.group(1)}-bit lossy JPEG"
    elif any(word in text.lower() for word in _JPEG2000_WORDS):
        what = f"JPEG 2000 ({lines[0][:120]})"
    elif "jpeg" in text.lower():
        what = f"JPEG ({lines[0][:120]})"
    else:
        what = f"the reader said: {lines[0][:120]}"
    return f"pixel data could not be decoded: {what}"


def _read_file(where: Path, file: Path, volume_index, output) -> RawImage:
    """Read ``file`` (errors name ``where``, and the file when ``where`` is its folder)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    reader.LoadPrivateTagsOn()
    _call(reader.ReadImageInformation, where, output, lambda: file)
    _raise_if_undecodable(where, output.text())
    if _is_mosaic(reader):
        raise _mosaic_error(where)
    check_volume_index(where, None, volume_index)
    image = _call(reader.Execute, where, output, lambda: file)
    _raise_if_undecodable(where, output.text())
    return _single_volume(where, image, "DICOM file")


def _single_volume(path: Path, image: sitk.Image, kind: str) -> RawImage:
    """A grey-level 3D ITK image (trailing size-1 axes dropped: a one-file series comes back 4D) as a RawImage."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"{kind} is not a grey-level image", "use a grey-level MR series")
    size = trim_trailing_singletons(image.GetSize())
    if len(size) != 3 or min(size) < 2:
        if len(size) > 3:
            raise InputError(path, f"{kind} has {len(size)} dimensions (size {size}); expected 3D",
                             "convert it to NIfTI with dcm2niix and list each volume as a manifest row")
        raise InputError(path, f"{kind} is 2D (a single slice), not a 3D volume", STACK_HINT)
    if image.GetDimension() > 3:
        image = image[(slice(None),) * 3 + (0,) * (image.GetDimension() - 3)]
    return itk_to_raw(image)


def _call(function, path: Path, output, culprit=lambda: None, cause: str | None = None):
    """``function()``; a RuntimeError from SimpleITK/GDCM becomes an InputError for ``path`` — the codec's
    complaint captured in ``output`` if there is one, else ``cause`` or "DICOM file {name} cannot be parsed" for
    the file ``culprit()`` finds (None: unknown) — never the library's own text."""
    try:
        return function()
    except RuntimeError:
        pass
    _raise_if_undecodable(path, output.text())
    if cause is not None:
        raise InputError(path, cause, DICOM_REEXPORT_HINT)
    file = culprit()
    named = "a DICOM file" if file is None else "the DICOM file" if file == path else f"DICOM file {file.name}"
    raise InputError(path, f"{named} cannot be parsed (damaged, truncated or not a DICOM image)",
                     "remove or replace that file, or convert the series to NIfTI with dcm2niix")


def _unparseable_member(folder: Path) -> Path | None:
    """The first DICOM-looking file of ``folder`` (Part 10 magic or a .dcm/.ima name) whose header GDCM cannot
    read, or None."""
    reader = sitk.ImageFileReader()
    for member in sorted(p for p in folder.iterdir() if p.is_file()):
        if not (_has_dicom_magic(member) or member.name.lower().endswith(DICOM_SUFFIXES)):
            continue
        reader.SetFileName(str(member))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return member
    return None


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(DICOM_MAGIC_OFFSET + 4)[DICOM_MAGIC_OFFSET:] == b"DICM"
    except OSError:
        return False


def _raise_if_undecodable(path: Path, captured: str) -> None:
    cause = decoding_problem(captured)
    if cause is not None:
        raise InputError(path, cause, DECODE_HINT)


def _is_mosaic(reader: sitk.ImageFileReader) -> bool:
    """ImageType names MOSAIC, or the Siemens CSA image header counts mosaic tiles."""
    if reader.HasMetaDataKey(IMAGE_TYPE_TAG):
        if "MOSAIC" in [part.strip().upper() for part in reader.GetMetaData(IMAGE_TYPE_TAG).split("\\")]:
            return True
    if not reader.HasMetaDataKey(CSA_IMAGE_HEADER_TAG):
        return False
    try:
        header = csareader.read(base64.b64decode(reader.GetMetaData(CSA_IMAGE_HEADER_TAG), validate=False))
        return bool(csareader.get_n_mosaic(header))
    except Exception:  # a CSA header nibabel cannot parse (several unrelated types): not evidence of a mosaic
        return False


def _mosaic_error(path: Path) -> InputError:
    return InputError(path, "Siemens mosaic DICOM (each file is a whole volume tiled into one 2D image); "
                            "braindino does not unpack mosaics", MOSAIC_HINT)


def _check_series_headers(path: Path, file_names, output) -> None:
    """Read every file's header once: refuse mosaics, folders of multi-frame files, and slices that are not at
    distinct, evenly spaced positions.

    Positions: each file's ImagePositionPatient projected on the slice normal (cross product of the first file's
    row and column direction cosines); the gaps between sorted positions must be non-zero (no two slices, e.g. of
    two interleaved acquisitions, at one position) and within ``SLICE_GAP_TOLERANCE`` of their median (no missing
    slice). A series where some file lacks either tag is not position-checked (GDCM orders such files as it can).
    """
    reader = sitk.ImageFileReader()
    reader.LoadPrivateTagsOn()
    positions, normal, multi_frame = [], None, 0
    for name in file_names:
        reader.SetFileName(name)
        _call(reader.ReadImageInformation, path, output, lambda: Path(name))
        if _is_mosaic(reader):
            raise _mosaic_error(path)
        frames = _dicom_numbers(reader, NUMBER_OF_FRAMES_TAG, 1)
        multi_frame += int(frames is not None and frames[0] > 1)
        position = _dicom_numbers(reader, IMAGE_POSITION_TAG, 3)
        orientation = _dicom_numbers(reader, IMAGE_ORIENTATION_TAG, 6)
        if position is None or orientation is None:
            positions = None
        elif positions is not None:
            normal = np.cross(orientation[:3], orientation[3:]) if normal is None else normal
            positions.append(float(position @ normal))
    if multi_frame:
        raise InputError(path, f"folder holds {len(file_names)} files of one series, {multi_frame} of them "
                               f"multi-frame (each a whole volume)",
                         "list each multi-frame .dcm file as its own manifest row")
    if positions is None or len(positions) < 2:
        return
    gaps = np.diff(np.sort(positions))                          # [n_files - 1] mm
    distinct = gaps >= SAME_POSITION_MM
    median = float(np.median(gaps))
    if not np.all(distinct) or np.any(np.abs(gaps - median) > SLICE_GAP_TOLERANCE * median):
        raise InputError(path, f"DICOM series has missing, duplicate or unevenly spaced slices "
                               f"({len(positions)} files at {int(distinct.sum()) + 1} distinct positions, slice gaps "
                               f"{gaps.min():.3g} to {gaps.max():.3g} mm, median {median:.3g} mm)",
                         "split or re-export the series")


def _dicom_numbers(reader: sitk.ImageFileReader, tag: str, count: int) -> np.ndarray | None:
    """The ``[count]`` float values of a backslash-separated numeric DICOM tag, or None if absent or malformed."""
    if not reader.HasMetaDataKey(tag):
        return None
    try:
        values = np.array([float(part) for part in reader.GetMetaData(tag).split("\\")], dtype=np.float64)
    except ValueError:
        return None
    return values if values.shape == (count,) and np.all(np.isfinite(values)) else None
