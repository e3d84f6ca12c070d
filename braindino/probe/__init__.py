"""Probing frozen encoders: protocols (splits, fractions, shots, seeds), heads per endpoint, baselines on the same
splits, metrics with subject-bootstrap CIs and paired tests, and the run's files. ``run_probe`` (:mod:`.run`) is
the Python entry point of ``braindino probe``; it is imported on first use, so ``braindino.probe.metrics`` and the
other modules stay light to import."""

__all__ = ["run_probe"]


def __getattr__(name):
    if name == "run_probe":
        from braindino.probe.run import run_probe

        return run_probe
    raise AttributeError(f"module 'braindino.probe' has no attribute {name!r}")
