"""Synthetic brain-MRI cohort built from the MNI152 template shipped inside nilearn (no download).

``generate_cohort(out_dir, n_subjects, seed, ...)`` writes T1w/T2w/FLAIR/T1c NIfTI images of subjects with
age-driven atrophy, AD-like medial-temporal atrophy, BraTS-like tumours (with masks, mutation and survival
targets) or vascular strokes, plus ``manifest.csv``; ``braindino synth`` is its command line.
"""

from braindino.synth.cohort import MANIFEST_COLUMNS, generate_cohort
from braindino.synth.sequences import SEQUENCES

__all__ = ["MANIFEST_COLUMNS", "SEQUENCES", "generate_cohort"]
