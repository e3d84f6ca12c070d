"""Self-supervised objectives: DINO (CLS), iBOT (masked patches), KoLeo, SimCLR, and the teacher targets they use."""

from braindino.losses.dino import DINOLoss
from braindino.losses.ibot import IBOTPatchLoss, masked_token_weights
from braindino.losses.koleo import KoLeoLoss
from braindino.losses.simclr import SimCLRLoss
from braindino.losses.teacher import TeacherCentering, sinkhorn_knopp

__all__ = ["DINOLoss", "IBOTPatchLoss", "KoLeoLoss", "SimCLRLoss", "TeacherCentering", "masked_token_weights",
           "sinkhorn_knopp"]
