"""Saliency maps of a ViT encoder and of probe heads on it, written in the input's native voxel grid:
:mod:`.maps` (attention, rollout, gradient maps per slice), :mod:`.head_gradient` (a fitted head's gradient),
:mod:`.volume_maps` (patch maps → NIfTI), :mod:`.montage` (PNG). ``run_saliency`` is the Python entry point of
``braindino saliency`` (:mod:`.command`)."""


def run_saliency(model, out, images=None, manifest=None, task=None, target=None, **options) -> list:
    """See :func:`braindino.saliency.command.run_saliency`."""
    from braindino.saliency.command import run_saliency as run

    return run(model, out, images=images, manifest=manifest, task=task, target=target, **options)


__all__ = ["run_saliency"]
