"""Read one MRI volume (NIfTI, MGH/MGZ, DICOM, MHA/MHD, NRRD/NHDR) into RAS+ canonical voxel order.

Every reader returns the raw voxel array plus its voxel->RAS affine; :func:`load_volume` then validates the geometry
and values and reorients the array with nibabel's orientation utilities, so that axis 0 runs to the Right, axis 1 to
the Anterior and axis 2 to the Superior (axial slices are ``data[:, :, z]``) whatever the on-disk layout was.
Every problem a user can fix raises :class:`braindino.errors.InputError`; messages never quote DICOM header fields.
nibabel's log messages and ITK's console warnings (which name no file) are switched off while a file is read, and
the DICOM codecs' console output is captured (:mod:`braindino.ingest.quiet`): each problem is reported once, as that
InputError. DICOM (a folder with one series, or one multi-frame ``.dcm`` file) is read by :mod:`braindino.ingest.dicom`.
"""

import gzip
import hashlib
import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from braindino.errors import InputError
from braindino.ingest.dicom import DICOM_SUFFIXES, read_dicom_file, read_dicom_folder
from braindino.ingest.quiet import library_output_captured
from braindino.ingest.raw import (REEXPORT_HINT, STACK_HINT, RawImage, check_volume_index, first_line,
                                  itk_to_raw, trim_trailing_singletons)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MGH_SUFFIXES = (".mgz", ".mgh")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
SUPPORTED_HINT = ("use .nii, .nii.gz, .mgz, .mgh, .mha, .mhd, .nrrd, .nhdr, a DICOM .dcm file, or a folder holding "
                  "one DICOM series")
MAX_AFFINE_CONDITION = 1e6
HASH_CHUNK_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"


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


def load_volume(path: str | os.PathLike, volume_index: int | None = None) -> Volume:
    """Read, validate and canonicalise one volume.

    ``path`` is a NIfTI / MGH / MGZ / MHA / MHD / NRRD / NHDR file, a DICOM file (``.dcm``/``.ima``: one
    multi-frame file holding a 3D volume) or a folder with one DICOM series. ``volume_index`` picks one
    volume of a 4D image (required there; must be ``None`` or ``0`` for 3D images).
    Returns a :class:`Volume` with ``data`` ``[X, Y, Z]`` float32 in RAS+ order. Raises :class:`InputError`.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found",
                         "check the path (relative manifest paths resolve against the manifest's folder)")
    name = path.name.lower()
    with library_output_captured():
        if path.is_dir():
            raw = read_dicom_folder(path, volume_index)
        elif name.endswith(DICOM_SUFFIXES):
            raw = read_dicom_file(path, volume_index)
        elif name.endswith(NIFTI_SUFFIXES):
            raw = _read_nifti(path, volume_index)
        elif name.endswith(MGH_SUFFIXES):
            raw = _read_mgh(path, volume_index)
        elif name.endswith(ITK_SUFFIXES):
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


def _read_nifti(path: Path, volume_index: int | None) -> RawImage:
    """NIfTI-1/2 via nibabel (scl_slope/inter applied); decompressed here so gzip damage is caught (CRC too)."""
    image, stored_pixdim = _parse_nifti_bytes(path, _read_maybe_gzipped(path))
    shape = trim_trailing_singletons(image.shape)
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise InputError(path, f"image is 2D (shape {tuple(image.shape)}), not a 3D volume", STACK_HINT)
    if len(shape) > 4:
        raise InputError(path, f"image has {len(shape)} dimensions (shape {shape}); expected 3D or 4D",
                         "split it into 3D volumes")
    index = check_volume_index(path, shape[3] if len(shape) == 4 else None, volume_index)
    try:
        voxels = image.dataobj if index is None else image.dataobj[:, :, :, index]
        data = np.asarray(voxels, dtype=np.float32).reshape(shape[:3])
    except (OSError, ValueError, EOFError) as error:
        raise InputError(path, f"image data are truncated or unreadable ({first_line(error)})",
                         REEXPORT_HINT) from None
    except TypeError:
        raise InputError(path, f"voxel type {image.header.get_data_dtype()} is not a real-valued scalar",
                         "convert the image to a scalar intensity type") from None
    return RawImage(data=data, affine=np.asarray(image.affine, dtype=np.float64), header_spacing=stored_pixdim)


def _read_mgh(path: Path, volume_index: int | None) -> RawImage:
    """FreeSurfer MGH/MGZ via nibabel (an .mgz is gzipped; decompressed here so gzip damage is caught)."""
    raw = _read_maybe_gzipped(path) if path.name.lower().endswith(".mgz") else _read_plain(path)
    try:
        image = nib.MGHImage.from_bytes(raw)
        zooms = tuple(float(v) for v in image.header.get_zooms()[:3])
    except Exception as error:  # nibabel raises several unrelated types (MGHError, ValueError, struct.error, ...)
        raise InputError(path, f"corrupt MGH header ({first_line(error)})", REEXPORT_HINT) from None
    shape = trim_trailing_singletons(image.shape)
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise InputError(path, f"image is 2D (shape {tuple(image.shape)}), not a 3D volume", STACK_HINT)
    index = check_volume_index(path, shape[3] if len(shape) == 4 else None, volume_index)
    try:
        voxels = image.dataobj if index is None else image.dataobj[:, :, :, index]
        data = np.asarray(voxels, dtype=np.float32).reshape(shape[:3])
    except (OSError, ValueError, EOFError) as error:
        raise InputError(path, f"image data are truncated or unreadable ({first_line(error)})",
                         REEXPORT_HINT) from None
    return RawImage(data=data, affine=np.asarray(image.affine, dtype=np.float64), header_spacing=zooms)


def _read_plain(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise InputError(path, f"cannot read the file ({error.strerror or first_line(error)})",
                         "check that the file is readable (permissions, network drive)") from None


def _read_maybe_gzipped(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except gzip.BadGzipFile as error:
        raise InputError(path, f"not a valid gzip file ({first_line(error)})",
                         "re-compress it with gzip, or drop the .gz ending if the file is not compressed")
    except EOFError:
        raise InputError(path, "gzip stream is truncated (the file ends early)",
                         "copy or download the file again")
    except zlib.error as error:
        raise InputError(path, f"gzip data is corrupt ({first_line(error)})", "copy or download the file again")
    except OSError as error:
        raise InputError(path, f"cannot read the file ({error.strerror or first_line(error)})",
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
        raise InputError(path, f"corrupt NIfTI header ({first_line(error)})", REEXPORT_HINT) from error


def _read_itk_file(path: Path, volume_index: int | None) -> RawImage:
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
    index = check_volume_index(path, size[3] if dimension == 4 else None, volume_index)
    _check_spacing(path, reader.GetSpacing()[:3], values_shown=True)
    try:
        image = reader.Execute()
    except RuntimeError:
        raise InputError(path, "image data are truncated or unreadable", REEXPORT_HINT) from None
    return itk_to_raw(image if index is None else image[:, :, :, index])


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
