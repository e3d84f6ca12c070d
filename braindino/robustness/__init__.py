"""Robustness suite: perturb test volumes before ingestion (:mod:`.perturbations`), score probe heads trained on
clean volumes (:mod:`.evaluate`), write the table, curves and ``metrics.json`` (:mod:`.outputs`).
``run_robustness`` (:mod:`.run`) is the Python entry point of ``braindino robustness``."""

from braindino.robustness.perturbations import PERTURBATIONS, perturb_array, perturb_volume

__all__ = ["PERTURBATIONS", "perturb_array", "perturb_volume", "run_robustness"]


def __getattr__(name):
    if name == "run_robustness":
        from braindino.robustness.run import run_robustness

        return run_robustness
    raise AttributeError(f"module 'braindino.robustness' has no attribute {name!r}")
