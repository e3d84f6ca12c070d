"""Robustness suite: perturb test volumes before ingestion (:mod:`.perturbations`), score probe heads trained on
clean volumes (:mod:`.evaluate`), write the table, curves and ``metrics.json`` (:mod:`.outputs`).
``run_robustness`` is the Python entry point of ``braindino robustness`` (:mod:`.command`)."""

from braindino.robustness.perturbations import PERTURBATIONS, perturb_array, perturb_volume


def run_robustness(models, manifest, out, task, target=None, **options) -> dict:
    """See :func:`braindino.robustness.command.run_robustness`."""
    from braindino.robustness.command import run_robustness as run

    return run(models, manifest, out, task, target, **options)


__all__ = ["PERTURBATIONS", "perturb_array", "perturb_volume", "run_robustness"]
