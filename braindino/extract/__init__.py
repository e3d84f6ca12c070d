"""Cohort feature extraction with a frozen encoder, the content-keyed cache and the features folder format."""

from braindino.extract.features import Features, open_features

__all__ = ["Features", "open_features"]
