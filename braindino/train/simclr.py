"""SimCLR on MRI slices (the BrainIAC objective): two augmented views, NT-Xent, no teacher.

Uses the same store, crops (the two global crops) and backbone as DINO, so the two methods compare side by side.
"""

from torch import nn

from braindino.losses import SimCLRLoss


class SimCLRStudent(nn.Module):
    """Backbone + projection MLP ``D → hidden → projection_dim``; the backbone's CLS is the representation."""

    def __init__(self, backbone: nn.Module, hidden_dim: int, projection_dim: int):
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Sequential(nn.Linear(backbone.embed_dim, hidden_dim), nn.GELU(),
                                        nn.Linear(hidden_dim, projection_dim))

    def forward(self, global_crops, local_crops=None, masks=None) -> dict:
        """global_crops ``[2*B,1,S,S]`` → ``cls [2*B,D]``, ``projection [2*B,P]`` (local crops and masks unused)."""
        cls = self.backbone.forward_features(global_crops)["cls"]
        return {"cls": cls, "projection": self.projection(cls)}


class SimCLRObjective(nn.Module):
    """NT-Xent between the projections of view 1 and view 2 of each slice (negatives from all processes)."""

    def __init__(self, config):
        super().__init__()
        self.loss = SimCLRLoss(temperature=config.simclr.temperature)

    def forward(self, student_out: dict, teacher_out, masks, teacher_temp: float, n_global: int,
                contrastive_share: float = 0.0):
        """→ (loss scalar, {"simclr": loss}, {} ) — same contract as ``DINOObjective`` (the last three unused)."""
        view1, view2 = student_out["projection"].float().chunk(2)
        loss = self.loss(view1, view2)
        return loss, {"simclr": loss}, {}


def build_simclr_network(config, backbone: nn.Module) -> SimCLRStudent:
    backbone.mask_token.requires_grad_(False)
    return SimCLRStudent(backbone, config.simclr.hidden_dim, config.simclr.projection_dim)
