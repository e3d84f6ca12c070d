"""DICOM files of the kinds real scanners and archives produce, written with SimpleITK/GDCM for the tests.

- :func:`write_enhanced_mr`: one Enhanced MR Image Storage file holding a whole 3D volume, with the per-frame
  functional groups (PlanePositionSequence per frame; PlaneOrientationSequence and PixelMeasuresSequence shared).
- :func:`write_mosaic_series`: Siemens mosaic files (ImageType ...\\MOSAIC), each a whole volume tiled into 2D.
- :func:`write_series_with_unparsable_member`: a good slice series plus one file whose header GDCM's series scanner
  throws on (SamplesPerPixel 0), quoting its build path in the exception text.
- :func:`write_12bit_lossy_jpeg`: a multi-frame file whose pixel data are 12-bit lossy JPEG (extended process,
  transfer syntax 1.2.840.10008.1.2.4.51), which the SimpleITK wheel's JPEG codec cannot decode.
- :func:`shipped_dicom`: a real scanner file shipped inside an installed package (nibabel, pydicom), or a skip.
"""

import gzip
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
PLANE_POSITION_SEQUENCE = b"\x20\x00\x13\x91"       # (0020,9113) in little-endian byte order
PLANE_ORIENTATION_SEQUENCE = b"\x20\x00\x16\x91"    # (0020,9116)
PIXEL_MEASURES_SEQUENCE = b"\x28\x00\x10\x91"       # (0028,9110)
PER_FRAME_GROUPS = b"\x00\x52\x30\x92"              # (5200,9230)
SAMPLES_PER_PIXEL_ELEMENT = b"\x28\x00\x02\x00\x02\x00\x00\x00"   # implicit VR: tag (0028,0002), length 2
JPEG_LOSSLESS_UID, JPEG_EXTENDED_UID = b"1.2.840.10008.1.2.4.70", b"1.2.840.10008.1.2.4.51"
SOF3_16_BIT, SOF1_12_BIT = b"\xff\xc3\x00\x0b\x10", b"\xff\xc1\x00\x0b\x0c"   # frame header: marker, length, P


def write_enhanced_mr(path: Path, image: sitk.Image) -> Path:
    """Write the 3D ``image`` as one Enhanced MR file (GDCM writes the functional groups from its geometry)."""
    image = sitk.Image(image)
    image.SetMetaData("0008|0016", ENHANCED_MR_STORAGE)
    image.SetMetaData("0008|0060", "MR")
    image.SetMetaData("0010|0010", "Doe^Jane")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(image)
    return path


def write_mr_slice(path: Path, plane: np.ndarray, position_mm, tags: dict) -> Path:
    """One single-frame MR file of ``plane`` ``[rows, cols]`` int16 at ``position_mm`` (LPS), axial, 1 mm pixels."""
    image = sitk.GetImageFromArray(plane.astype(np.int16))
    every = {"0008|0016": MR_STORAGE, "0008|0060": "MR", "0010|0010": "Doe^Jane", "0020|0037": "1\\0\\0\\0\\1\\0",
             "0020|0032": "\\".join(f"{v:g}" for v in position_mm), **tags}
    for tag, value in every.items():
        image.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(image)
    return path


def write_mosaic_series(folder: Path, n_files: int = 2, tiles: int = 4, tile: int = 16) -> Path:
    """``n_files`` Siemens-style mosaics of one series in ``folder``, 3 mm apart (so that, read as slices, they
    stack into a plausible-looking volume): each ``[tiles*tile, tiles*tile]`` image is a ``tiles x tiles`` grid of
    ``tile``-px slices (the bright disc shrinks from tile to tile), ImageType MOSAIC."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:tile, :tile] - (tile - 1) / 2
    mosaic = np.zeros((tiles * tile, tiles * tile), dtype=np.int16)
    for number in range(tiles * tiles):
        row, col = divmod(number, tiles)
        mosaic[row * tile:(row + 1) * tile, col * tile:(col + 1) * tile] = 100 + 500 * (
            np.hypot(yy, xx) < tile / 2 - number / 3)
    series = "1.2.826.0.1.3680043.2.1125.30.1"
    for number in range(n_files):
        write_mr_slice(folder / f"mosaic_{number:03d}.dcm", mosaic, (0, 0, 3.0 * number),
                       {"0008|0008": "ORIGINAL\\PRIMARY\\M\\ND\\MOSAIC", "0020|000d": f"{series}.0",
                        "0020|000e": series, "0020|0013": str(number + 1), "0020|0012": str(number + 1),
                        "0008|0018": f"{series}.{number + 1}"})
    return folder


def write_series_with_unparsable_member(folder: Path, name: str = "zz_damaged.dcm", n_slices: int = 4) -> Path:
    """``n_slices`` good axial slices of one series plus ``name``: a copy of one slice with SamplesPerPixel 0."""
    folder.mkdir(parents=True, exist_ok=True)
    series = "1.2.826.0.1.3680043.2.1125.31.1"
    rng = np.random.default_rng(3)
    for k in range(n_slices):
        write_mr_slice(folder / f"slice_{k:03d}.dcm", rng.integers(100, 900, size=(12, 10)), (0, 0, 2.0 * k),
                       {"0020|000d": f"{series}.0", "0020|000e": series, "0020|0013": str(k + 1),
                        "0008|0018": f"{series}.{k + 1}"})
    raw = (folder / "slice_000.dcm").read_bytes()
    at = raw.index(SAMPLES_PER_PIXEL_ELEMENT) + len(SAMPLES_PER_PIXEL_ELEMENT)
    (folder / name).write_bytes(raw[:at] + b"\x00\x00" + raw[at + 2:])
    return folder


def write_12bit_lossy_jpeg(path: Path, shape=(16, 16, 4)) -> Path:
    """A multi-frame MR file of ``shape`` ``[X, Y, Z]`` whose frames are JPEG streams declaring 12-bit lossy
    (extended sequential, SOF1) coding: GDCM writes lossless JPEG, then the transfer syntax and each frame header
    are rewritten to what a 12-bit lossy archive export holds (same byte lengths, so the file stays well formed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"lossless-{path.name}.dcm")
    data = np.random.default_rng(4).integers(0, 4000, size=shape[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(data)
    image.SetMetaData("0008|0016", ENHANCED_MR_STORAGE)
    image.SetMetaData("0008|0060", "MR")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.SetFileName(str(staging))
    writer.Execute(image)
    raw = staging.read_bytes()
    staging.unlink()
    assert raw.count(JPEG_LOSSLESS_UID) == 1 and raw.count(SOF3_16_BIT) == shape[2]
    path.write_bytes(raw.replace(JPEG_LOSSLESS_UID, JPEG_EXTENDED_UID).replace(SOF3_16_BIT, SOF1_12_BIT))
    return path


def shipped_dicom(package: str, relative: str, into: Path) -> Path:
    """Copy the DICOM file ``relative`` (under ``package``'s folder; ``.gz`` ones decompressed) into folder
    ``into`` and return the copy; skip the test when the package or the file is not installed (never downloaded)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} is not installed")
    source = Path(spec.origin).parent / relative
    if not source.is_file():
        pytest.skip(f"{package} does not ship {relative}")
    into.mkdir(parents=True, exist_ok=True)
    if source.name.endswith(".gz"):
        target = into / source.name[:-3]
        target.write_bytes(gzip.decompress(source.read_bytes()))
        return target
    return Path(shutil.copy(source, into / source.name))
