"""braindino: brain-MRI foundation models by slice-wise self-distillation (DINOv2 recipe on 2D axial slices)."""

__version__ = "0.1.0"
