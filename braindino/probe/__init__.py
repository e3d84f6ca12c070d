"""Probing frozen encoders: protocols (splits, fractions, shots, seeds), heads per endpoint, baselines on the same
splits, metrics with subject-bootstrap CIs and paired tests, and the run's files (``python probe.py``)."""
