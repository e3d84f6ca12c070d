"""ViT backbone with an iBOT mask token, DINO head, attention backends, optimizer groups, pretrained-weight loading."""
from braindino.models.attention import set_attention_backend, xformers_available
from braindino.models.dino_head import DINOHead
from braindino.models.init_from import load_pretrained_backbone
from braindino.models.param_groups import parameter_groups
from braindino.models.vit import PRESETS, MaskableViT, build_backbone

__all__ = [
    "PRESETS",
    "DINOHead",
    "MaskableViT",
    "build_backbone",
    "load_pretrained_backbone",
    "parameter_groups",
    "set_attention_backend",
    "xformers_available",
]
