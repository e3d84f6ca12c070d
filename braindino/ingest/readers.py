"""Read one MRI volume (NIfTI, DICOM series, MHA/MHD, NRRD/NHDR) into RAS+ canonical voxel order.

Every reader returns the raw voxel array plus its voxel->RAS affine; :func:`load_volume` then validates the geometry
and values and reorients the array with nibabel's orientation utilities, so that axis 0 runs to the Right, axis 1 to
the Anterior and axis 2 to the Superior (axial slices are ``data[:, :, z]``) whatever the on-disk layout was.
Every problem a user can fix raises :class:`braindino.errors.InputError`; messages never quote DICOM header fields.
nibabel's log messages and ITK's console warnings (which name no file) are switched off while a file is read: each
problem is reported once, as that InputError.
"""

import contextlib
import gzip
import hashlib
import io
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from braindino.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
SUPPORTED_HINT = "use .nii, .nii.gz, .mha, .mhd, .nrrd, .nhdr, or a folder holding one DICOM series"
REEXPORT_HINT = "re-export the image from the scanner or conversion tool"
STACK_HINT = "braindino slices 3D volumes; stack the slices into one 3D image"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
MAX_AFFINE_CONDITION = 1e6
HASH_CHUNK_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
IMAGE_POSITION_TAG = "0020|0032"        # DICOM ImagePositionPatient: x\y\z of the slice's first voxel, mm (LPS)
IMAGE_ORIENTATION_TAG = "0020|0037"     # DICOM ImageOrientationPatient: row and column direction cosines
SLICE_GAP_TOLERANCE = 0.1               # a DICOM slice gap may differ from the median gap by this share
SAME_POSITION_MM = 1e-3                 # two DICOM slices closer than this along the normal share one position
DICOM_UNREADABLE = "DICOM series cannot be read (damaged files or inconsistent slice geometry)"
DICOM_REEXPORT_HINT = "re-export the series, or convert it to NIfTI with dcm2niix"


@dataclass
class Volume:
    """One 3D MRI volume in RAS+ canonical voxel order.

    ``data`` is ``[X, Y, Z]`` float32 (axis 0 = R, axis 1 = A, axis 2 = S, so ``data[:, :, z]`` is an axial slice);
    ``affine`` is the ``[4, 4]`` float64 voxel->RAS-mm matrix of ``data``; ``spacing`` is mm along X, Y, Z.
    ``native_affine`` ``[4, 4]`` and ``native_shape`` ``(i, j, k)`` describe the file's own voxel grid before
    reorientation (``None`` for volumes built in memory), so results can be written back in the input's grid.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source_path: str
    native_affine: np.ndarray | None = None
    native_shape: tuple[int, int, int] | None = None


@dataclass
class _RawImage:
    """A reader's output before validation: ``data`` is the chosen ``[X, Y, Z]`` volume in on-disk voxel order."""

    data: np.ndarray
    affine: np.ndarray
    header_spacing: tuple[float, ...]


def load_volume(path: str | os.PathLike, volume_index: int | None = None) -> Volume:
    """Read, validate and canonicalise one volume.

    ``path`` is a NIfTI / MHA / MHD / NRRD / NHDR file or a folder with one DICOM series. ``volume_index`` picks one
    volume of a 4D image (required there; must be ``None`` or ``0`` for 3D images).
    Returns a :class:`Volume` with ``data`` ``[X, Y, Z]`` float32 in RAS+ order. Raises :class:`InputError`.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found",
                         "check the path (relative manifest paths resolve against the manifest's folder)")
    with _library_warnings_silenced():
        if path.is_dir():
            raw = _read_dicom_series(path, volume_index)
        elif path.name.lower().endswith(NIFTI_SUFFIXES):
            raw = _read_nifti(path, volume_index)
        elif path.name.lower().endswith(ITK_SUFFIXES):
            raw = _read_itk_file(path, volume_index)
        else:
            extension = "".join(path.suffixes[-2:]) or "(none)"
            raise InputError(path, f"unsupported file extension {extension}", SUPPORTED_HINT)
    _check_geometry(path, raw.header_spacing, raw.affine, values_shown=not path.is_dir())
    _check_values(path, raw.data)
    return _to_canonical(path, raw.data, raw.affine)


def content_hash(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks.

    For a DICOM folder the digest covers every regular file directly inside it, in sorted name order, each
    preceded by its name and size (so moving bytes between files changes the digest).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found", "check the path")
    digest = hashlib.sha256()
    if path.is_dir():
        for member in sorted(p for p in path.iterdir() if p.is_file()):
            digest.update(f"{member.name}\0{member.stat().st_size}\0".encode())
            _hash_file_into(member, digest)
    else:
        _hash_file_into(path, digest)
    return digest.hexdigest()


def _hash_file_into(path: Path, digest) -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)


def _read_nifti(path: Path, volume_index: int | None) -> _RawImage:
    """NIfTI-1/2 via nibabel (scl_slope/inter applied); decompressed here so gzip damage is caught (CRC too)."""
    image, stored_pixdim = _parse_nifti_bytes(path, _read_maybe_gzipped(path))
    shape = _trim_trailing_singletons(image.shape)
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise InputError(path, f"image is 2D (shape {tuple(image.shape)}), not a 3D volume", STACK_HINT)
    if len(shape) > 4:
        raise InputError(path, f"image has {len(shape)} dimensions (shape {shape}); expected 3D or 4D",
                         "split it into 3D volumes")
    index = _check_volume_index(path, shape[3] if len(shape) == 4 else None, volume_index)
    try:
        voxels = image.dataobj if index is None else image.dataobj[:, :, :, index]
        data = np.asarray(voxels, dtype=np.float32).reshape(shape[:3])
    except (OSError, ValueError, EOFError) as error:
        raise InputError(path, f"image data are truncated or unreadable ({_first_line(error)})",
                         REEXPORT_HINT) from None
    except TypeError:
        raise InputError(path, f"voxel type {image.header.get_data_dtype()} is not a real-valued scalar",
                         "convert the image to a scalar intensity type") from None
    return _RawImage(data=data, affine=np.asarray(image.affine, dtype=np.float64), header_spacing=stored_pixdim)


def _read_maybe_gzipped(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except gzip.BadGzipFile as error:
        raise InputError(path, f"not a valid gzip file ({_first_line(error)})",
                         "re-compress it with gzip, or drop the .gz ending if the file is not compressed")
    except EOFError:
        raise InputError(path, "gzip stream is truncated (the file ends early)",
                         "copy or download the file again")
    except zlib.error as error:
        raise InputError(path, f"gzip data is corrupt ({_first_line(error)})", "copy or download the file again")
    except OSError as error:
        raise InputError(path, f"cannot read the file ({error.strerror or _first_line(error)})",
                         "check that the file is readable (permissions, network drive)") from None


def _parse_nifti_bytes(path: Path, raw: bytes) -> tuple[nib.Nifti1Image, tuple[float, float, float]]:
    """Return the nibabel image and the voxel sizes exactly as stored (nibabel silently "fixes" 0 or < 0)."""
    if len(raw) < 4:
        raise InputError(path, "file is too short to hold a NIfTI header", REEXPORT_HINT)
    if raw[:2] == GZIP_MAGIC:
        raise InputError(path, "file is gzip-compressed but its name does not end in .gz", "rename it to .nii.gz")
    header_size = {struct.unpack("<i", raw[:4])[0], struct.unpack(">i", raw[:4])[0]}
    image_class = nib.Nifti1Image if 348 in header_size else nib.Nifti2Image if 540 in header_size else None
    if image_class is None:
        raise InputError(path, "corrupt NIfTI header (header size field is neither 348 nor 540)", REEXPORT_HINT)
    try:
        stored_header = image_class.header_class.from_fileobj(io.BytesIO(raw), check=False)
        return image_class.from_bytes(raw), tuple(float(v) for v in stored_header["pixdim"][1:4])
    except Exception as error:  # nibabel raises several unrelated types (HeaderDataError, WrapStructError, ...)
        raise InputError(path, f"corrupt NIfTI header ({_first_line(error)})", REEXPORT_HINT) from error


def _read_itk_file(path: Path, volume_index: int | None) -> _RawImage:
    """MHA/MHD/NRRD/NHDR via SimpleITK; the header is checked before the voxel data are read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(path, "corrupt or unreadable image header", REEXPORT_HINT) from None
    dimension, size = reader.GetDimension(), reader.GetSize()
    if reader.GetNumberOfComponents() != 1:
        raise InputError(path, f"voxels have {reader.GetNumberOfComponents()} components (vector/RGB image)",
                         "convert the image to a scalar intensity image")
    if dimension < 3 or min(size[:3]) < 2:
        raise InputError(path, f"image is 2D (size {size}), not a 3D volume", STACK_HINT)
    if dimension > 4:
        raise InputError(path, f"image has {dimension} dimensions; expected 3D or 4D", "split it into 3D volumes")
    index = _check_volume_index(path, size[3] if dimension == 4 else None, volume_index)
    _check_spacing(path, reader.GetSpacing()[:3], values_shown=True)
    try:
        image = reader.Execute()
    except RuntimeError:
        raise InputError(path, "image data are truncated or unreadable", REEXPORT_HINT) from None
    return _itk_to_raw(image if index is None else image[:, :, :, index])


def _read_dicom_series(path: Path, volume_index: int | None) -> _RawImage:
    """A folder with exactly one DICOM series, read by SimpleITK/GDCM (slices sorted by position)."""
    if not any(path.iterdir()):
        raise InputError(path, "DICOM folder is empty", "point the manifest at the folder that holds the .dcm files")
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if len(series_ids) == 0:
        raise InputError(path, "folder holds no readable DICOM series",
                         "point the manifest at a folder of DICOM slice files (or at an image file)")
    if len(series_ids) > 1:
        raise InputError(path, f"folder holds {len(series_ids)} DICOM series",
                         "move each series into its own folder and list each folder as a manifest row")
    _check_volume_index(path, None, volume_index)
    file_names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series_ids[0])
    _check_slice_positions(path, file_names)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(file_names)
    try:
        image = reader.Execute()
    except RuntimeError:
        raise InputError(path, DICOM_UNREADABLE, DICOM_REEXPORT_HINT) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, "DICOM series is not a grey-level image", "use a grey-level MR series")
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise InputError(path, "DICOM series is 2D (a single slice), not a 3D volume", STACK_HINT)
    return _itk_to_raw(image)


def _check_slice_positions(path: Path, file_names) -> None:
    """Refuse a DICOM series whose slices are not at distinct, evenly spaced positions.

    Each file's ImagePositionPatient is projected on the slice normal (cross product of the first file's row and
    column direction cosines); the gaps between sorted positions must be non-zero (no two slices, e.g. of two
    interleaved acquisitions, at one position) and within ``SLICE_GAP_TOLERANCE`` of their median (no missing
    slice). A series where some file lacks either tag is not checked here (GDCM orders such files as it can).
    """
    reader = sitk.ImageFileReader()
    positions, normal = [], None
    for name in file_names:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise InputError(path, DICOM_UNREADABLE, DICOM_REEXPORT_HINT) from None
        position = _dicom_numbers(reader, IMAGE_POSITION_TAG, 3)
        orientation = _dicom_numbers(reader, IMAGE_ORIENTATION_TAG, 6)
        if position is None or orientation is None:
            return
        if normal is None:
            normal = np.cross(orientation[:3], orientation[3:])
        positions.append(float(position @ normal))
    if len(positions) < 2:
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


@contextlib.contextmanager
def _library_warnings_silenced():
    """Switch nibabel's log messages and ITK's console warnings off for the duration (restored afterwards)."""
    nibabel_log = logging.getLogger("nibabel")
    level, shown = nibabel_log.level, sitk.ProcessObject.GetGlobalWarningDisplay()
    nibabel_log.setLevel(logging.ERROR)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        nibabel_log.setLevel(level)
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _itk_to_raw(image: sitk.Image) -> _RawImage:
    """Convert a 3D ITK image (LPS geometry, ``[Z, Y, X]`` array) to a RAS affine and an ``[X, Y, Z]`` array."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    data = np.array(sitk.GetArrayViewFromImage(image).T, dtype=np.float32)   # copy: the view dies with `image`
    return _RawImage(data=data, affine=affine, header_spacing=tuple(float(s) for s in spacing))


def _check_volume_index(path: Path, n_volumes: int | None, volume_index) -> int | None:
    """Validate ``volume_index`` for a 3D (``n_volumes=None``) or 4D image; return the index to read or None."""
    if volume_index is not None and not _is_whole_number(volume_index):
        raise InputError(path, f"volume_index={volume_index!r} is not a whole number",
                         "give volume_index as 0, 1, 2, ... (or leave it empty for 3D images)")
    if n_volumes is None:
        if volume_index not in (None, 0):
            raise InputError(path, f"volume_index={volume_index} given but the image is 3D",
                             "leave volume_index empty (or 0) for 3D images")
        return None
    if volume_index is None:
        raise InputError(path, f"image is 4D with {n_volumes} volumes but no volume_index was given",
                         f"add a volume_index column (0..{n_volumes - 1}) to the manifest row")
    if not 0 <= volume_index < n_volumes:
        raise InputError(path, f"volume_index={volume_index} is out of range for a 4D image with {n_volumes} "
                               f"volumes", f"use a volume_index between 0 and {n_volumes - 1}")
    return int(volume_index)


def _is_whole_number(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_spacing(path: Path, spacing, values_shown: bool) -> None:
    spacing = np.asarray(spacing, dtype=np.float64)
    bad_axes = [axis for axis, value in enumerate(spacing) if not (np.isfinite(value) and value > 0)]
    if bad_axes:
        shown = f" ({', '.join(f'{v:g}' for v in spacing)} mm)" if values_shown else ""
        raise InputError(path, f"voxel spacing is zero, negative or not a number along axis "
                               f"{', '.join(map(str, bad_axes))}{shown}",
                         "fix the voxel size in the header (NIfTI pixdim / ITK spacing) or re-export the image")


def _check_geometry(path: Path, header_spacing, affine: np.ndarray, values_shown: bool) -> None:
    _check_spacing(path, header_spacing, values_shown)
    linear = affine[:3, :3]
    if not np.all(np.isfinite(affine)) or np.linalg.cond(linear) > MAX_AFFINE_CONDITION:
        raise InputError(path, "voxel-to-world affine is singular or not finite (axes collapse onto each other)",
                         "fix the orientation in the header (NIfTI sform/qform, ITK direction) or re-export")


def _check_values(path: Path, data: np.ndarray) -> None:
    if not np.all(np.isfinite(data)):
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise InputError(path, f"{n_bad} voxels are NaN or infinite",
                         "replace them (e.g. with 0) or re-run the step that produced the image")


def _to_canonical(path: Path, data: np.ndarray, affine: np.ndarray) -> Volume:
    """Reorder/flip ``data`` [X, Y, Z] to the closest RAS+ layout and update the affine to match."""
    orientation = nib.orientations.io_orientation(affine)
    canonical = np.ascontiguousarray(nib.orientations.apply_orientation(data, orientation), dtype=np.float32)
    canonical_affine = affine @ nib.orientations.inv_ornt_aff(orientation, data.shape)
    spacing = tuple(float(s) for s in np.sqrt((canonical_affine[:3, :3] ** 2).sum(axis=0)))
    return Volume(data=canonical, affine=canonical_affine, spacing=spacing, source_path=str(path),
                  native_affine=np.array(affine, dtype=np.float64), native_shape=tuple(int(n) for n in data.shape))


def _trim_trailing_singletons(shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
