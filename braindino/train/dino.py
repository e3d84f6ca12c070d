"""The DINOv2 objective on MRI slices: student and EMA teacher networks, and how their outputs become one loss.

Shapes: ``G`` global crops and ``L`` local crops of a local batch of ``B`` slices arrive crop-major
(``[G*B, 1, S, S]``, row ``c*B + b`` is crop ``c`` of slice ``b``); ``N`` patches per global crop; ``K`` prototypes.
iBOT masks arrive as a ``MaskBatch`` (``braindino.augment``): ``[G*B, N]`` masks plus the ``[M]`` flat indices and
loss weights of the masked tokens, made on the CPU, so no step needs a token count back from the device.
"""

import copy

import torch
from torch import nn

from braindino.augment import MaskBatch
from braindino.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss, SimCLRLoss, TeacherCentering, sinkhorn_knopp
from braindino.models import DINOHead


def masked_patch_tokens(patch_tokens: torch.Tensor, masks: MaskBatch) -> torch.Tensor:
    """``[G*B, N, D]`` → ``[M, D]``: the tokens at ``masks.indices`` (row-major over ``[G*B, N]``)."""
    return patch_tokens.flatten(0, 1).index_select(0, masks.indices)


class DINOStudent(nn.Module):
    """Backbone + DINO head (+ iBOT head, shared with the DINO head unless configured separate)."""

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module | None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def forward(self, global_crops, local_crops, masks: MaskBatch | None = None) -> dict:
        """global_crops ``[G*B,1,S,S]``, local_crops ``[L*B,1,s,s]``, masks or None →
        ``cls [G*B,D]``, ``dino_global [G*B,K]``, ``bottleneck_global [G*B,b]`` (the head's unit bottleneck),
        ``dino_local [L*B,K]`` or None, ``ibot [M,K]`` or None."""
        features = self.backbone.forward_features(global_crops, None if masks is None else masks.masks)
        dino_global, bottleneck_global = self.dino_head(features["cls"], return_bottleneck=True)
        out = {"cls": features["cls"], "dino_global": dino_global, "bottleneck_global": bottleneck_global,
               "dino_local": None, "ibot": None}
        if local_crops.shape[0] > 0:
            out["dino_local"] = self.dino_head(self.backbone.forward_features(local_crops)["cls"])
        if masks is not None and self.ibot_head is not None:
            out["ibot"] = self.ibot_head(masked_patch_tokens(features["patch"], masks))
        return out

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Prototype weights of every head (DINO, and iBOT when separate), kept fixed during the first iterations."""
        heads = [self.dino_head] + ([self.ibot_head] if self.ibot_head not in (None, self.dino_head) else [])
        return [parameter for head in heads for parameter in head.last_layer_parameters()]


class DINOTeacher(nn.Module):
    """The EMA copy of the student; sees only the unmasked global crops, never receives gradients."""

    def __init__(self, student: DINOStudent):
        super().__init__()
        # one deepcopy call keeps a shared DINO/iBOT head shared in the teacher too
        self.backbone, self.dino_head, self.ibot_head = copy.deepcopy(
            (student.backbone, student.dino_head, student.ibot_head))
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def forward(self, global_crops, masks: MaskBatch | None = None, cls_only: bool = False):
        """→ ``dino [G*B,K]`` logits, ``ibot [M,K]`` logits of the patches the student saw masked (or None);
        with ``cls_only`` just the backbone's CLS embedding ``[G*B, D]`` (the encoder a probe would use)."""
        features = self.backbone.forward_features(global_crops)
        if cls_only:
            return features["cls"]
        out = {"dino": self.dino_head(features["cls"]), "ibot": None}
        if masks is not None and self.ibot_head is not None:
            out["ibot"] = self.ibot_head(masked_patch_tokens(features["patch"], masks))
        return out


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float | torch.Tensor) -> None:
    """EMA: ``teacher ← momentum * teacher + (1 - momentum) * student``, parameter by parameter.

    ``momentum`` may be a 0-dim tensor on the parameters' device (a momentum of exactly 1 leaves the teacher
    bit-identical: how a skipped step keeps it without reading anything back to the host).

    Under FSDP2 both networks are sharded alike and the update runs shard by shard; the root module keeps its
    parameters gathered after forward, so both are resharded first.
    """
    for network in (student, teacher):
        if hasattr(network, "reshard"):
            network.reshard()
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


class DINOObjective(nn.Module):
    """``(1 - c) * (w_dino * DINO + w_ibot * iBOT + w_koleo * KoLeo) + c * contrastive``; holds the teacher centres
    (resumable).

    ``c`` is the scheduled share of the contrastive warm start (``contrastive_warmup`` in the config; 0 when off):
    SimCLR's NT-Xent between the two global crops' unit bottlenecks of the student's DINO head, alone at first, then
    cross-faded into DINO. It leaves DINO's uniform-target fixed point on short runs: at init the teacher's cosine
    logits barely differ across slices, so Sinkhorn's targets are near-uniform and self-distillation has nothing to
    amplify; a bottleneck spread over the sphere makes the targets differ between slices when DINO takes over.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        dino, ibot = config.dino, config.ibot
        self.dino_loss = DINOLoss(student_temp=dino.student_temp)
        self.ibot_loss = IBOTPatchLoss(student_temp=dino.student_temp)
        self.koleo_loss = KoLeoLoss()
        self.contrastive_loss = SimCLRLoss(temperature=config.contrastive_warmup.temperature)
        self.dino_centering = TeacherCentering(dino.n_prototypes, momentum=dino.center_momentum)
        ibot_dim = ibot.n_prototypes if ibot.separate_head else dino.n_prototypes
        self.ibot_centering = TeacherCentering(ibot_dim, momentum=dino.center_momentum)

    @property
    def uses_ibot(self) -> bool:
        return self.config.ibot.loss_weight > 0

    def _teacher_probabilities(self, logits, centering: TeacherCentering, temp: float):
        logits = logits.float()
        if self.config.dino.teacher_target == "sinkhorn":
            return sinkhorn_knopp(logits, temp)
        probs = centering.probabilities(logits, temp)
        centering.update(logits)
        return probs

    def forward(self, student_out: dict, teacher_out: dict, masks: MaskBatch | None, teacher_temp: float,
                n_global: int, contrastive_share: float = 0.0):
        """→ (total loss scalar, {term: 0-dim tensor}, {"teacher_probs": [G*B,K], "teacher_logits": [G*B,K],
        "student_logits": [G*B,K]}). ``contrastive_share`` is this step's scheduled c (a Python float, the same
        on every rank: the contrastive term is computed only while it is positive)."""
        weights = self.config
        teacher_probs = self._teacher_probabilities(teacher_out["dino"], self.dino_centering, teacher_temp)
        student_global = student_out["dino_global"].float()
        batch = student_global.shape[0] // n_global
        local = student_out["dino_local"]
        student_local = None if local is None else local.float().unflatten(0, (-1, batch))
        terms = {"dino": self.dino_loss(student_global.unflatten(0, (n_global, batch)), student_local,
                                        teacher_probs.unflatten(0, (n_global, batch)))}
        total = weights.dino.loss_weight * terms["dino"]
        if self.uses_ibot and student_out["ibot"] is not None:
            ibot_probs = self._teacher_probabilities(teacher_out["ibot"], self.ibot_centering, teacher_temp)
            terms["ibot"] = self.ibot_loss(student_out["ibot"].float(), ibot_probs, masks.weights)
            total = total + weights.ibot.loss_weight * terms["ibot"]
        if weights.koleo.loss_weight > 0:
            chunks = student_out["cls"].chunk(n_global)
            terms["koleo"] = sum(self.koleo_loss(chunk) for chunk in chunks) / n_global
            total = total + weights.koleo.loss_weight * terms["koleo"]
        if contrastive_share > 0:
            first, second = student_out["bottleneck_global"].float().chunk(n_global)[:2]
            terms["contrastive"] = self.contrastive_loss(first, second)
            total = (1.0 - contrastive_share) * total + contrastive_share * terms["contrastive"]
        return total, terms, {"teacher_probs": teacher_probs, "teacher_logits": teacher_out["dino"].detach(),
                              "student_logits": student_global}


def build_dino_networks(config, backbone: nn.Module) -> tuple[DINOStudent, DINOTeacher]:
    """Student (backbone + heads) and its teacher copy, from the ``dino``/``ibot`` config sections."""
    dino, ibot = config.dino, config.ibot

    def head(n_prototypes):
        return DINOHead(backbone.embed_dim, n_prototypes, hidden_dim=dino.head_hidden_dim,
                        bottleneck_dim=dino.head_bottleneck_dim, n_layers=dino.head_n_layers,
                        batchnorm=dino.head_batchnorm)

    dino_head = head(dino.n_prototypes)
    if ibot.loss_weight <= 0:
        ibot_head = None
        backbone.mask_token.requires_grad_(False)
    else:
        ibot_head = head(ibot.n_prototypes) if ibot.separate_head else dino_head
    student = DINOStudent(backbone, dino_head, ibot_head)
    return student, DINOTeacher(student)
