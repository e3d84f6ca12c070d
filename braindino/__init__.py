"""braindino: brain-MRI foundation models by slice-wise self-distillation (DINOv2 recipe on 2D axial slices).

``braindino.load_encoder(spec)`` is imported on first use, so ``import braindino`` stays light (no torch).
"""

__version__ = "0.1.0"
__all__ = ["load_encoder"]


def __getattr__(name):
    if name == "load_encoder":
        from braindino.encoder import load_encoder

        return load_encoder
    raise AttributeError(f"module 'braindino' has no attribute {name!r}")
