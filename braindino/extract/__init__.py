"""Cohort feature extraction with a frozen encoder, the content-keyed cache and the features folder format."""

from braindino.extract.cohort import embed_cohort, extract_cohort, extract_cohorts
from braindino.extract.features import Features, open_features

__all__ = ["Features", "embed_cohort", "extract_cohort", "extract_cohorts", "open_features"]
