"""Saliency maps of a ViT encoder and of probe heads on it, written in the input's native voxel grid:
:mod:`.maps` (attention, rollout, gradient maps per slice), :mod:`.head_gradient` (a fitted head's gradient),
:mod:`.volume_maps` (patch maps → NIfTI), :mod:`.montage` (PNG). ``run_saliency`` (:mod:`.run`) is the Python entry
point of ``braindino saliency``."""

__all__ = ["run_saliency"]


def __getattr__(name):
    if name == "run_saliency":
        from braindino.saliency.run import run_saliency

        return run_saliency
    raise AttributeError(f"module 'braindino.saliency' has no attribute {name!r}")
