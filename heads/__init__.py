"""Task heads that aggregate per-slice braindino embeddings into per-volume predictions.

scikit-learn-shaped estimators (``fit / predict / score``, no file I/O). A "bag" is one volume's per-slice features
``[S, D]``; pooled features are ``[V, D]``; survival targets are scikit-survival structured arrays (event, time).
"""

from heads.brain_age import BrainAgeCorrection
from heads.cox import cox_partial_likelihood_loss
from heads.linear import CoxPHInnerCV, LogisticRegressionInnerCV, make_linear_head
from heads.mil import AttentionMILHead
from heads.mlp import MLPHead
from heads.pooling import SlicePooling
from heads.segmentation import SegmentationDecoder, dice_score
from heads.targets import TASKS, concordance, make_survival_target, survival_arrays

__all__ = [
    "TASKS",
    "AttentionMILHead",
    "BrainAgeCorrection",
    "CoxPHInnerCV",
    "LogisticRegressionInnerCV",
    "MLPHead",
    "SegmentationDecoder",
    "SlicePooling",
    "concordance",
    "cox_partial_likelihood_loss",
    "dice_score",
    "make_linear_head",
    "make_survival_target",
    "survival_arrays",
]
