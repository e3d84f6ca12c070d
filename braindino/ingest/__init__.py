"""Reading MRI volumes (NIfTI, DICOM, MHA/MHD, NRRD/NHDR) and turning them into normalised axial slices."""

from braindino.ingest.config import PreprocessConfig
from braindino.ingest.preprocess import PreprocessedVolume, foreground_mask, preprocess_volume
from braindino.ingest.readers import Volume, content_hash, load_volume

__all__ = [
    "PreprocessConfig",
    "PreprocessedVolume",
    "Volume",
    "content_hash",
    "foreground_mask",
    "load_volume",
    "preprocess_volume",
]
