"""Attention backends: SDPA vs xFormers on CUDA (skipped without both), backend selection on any machine."""
import copy

import pytest
import torch
from timm.layers import Attention

from braindino.models import build_backbone, set_attention_backend, xformers_available
from braindino.models.attention import XFormersAttention

needs_xformers = pytest.mark.skipif(
    not xformers_available(), reason="needs a CUDA device and an importable xformers (pip install xformers)"
)
without_xformers = pytest.mark.skipif(
    xformers_available(), reason="checks behaviour on machines without CUDA + xformers"
)


def tiny_vit(**overrides):
    torch.manual_seed(0)
    return build_backbone("vit_tiny", depth=2, img_size=32, patch_size=8, **overrides)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


@without_xformers
def test_auto_falls_back_to_sdpa_and_xformers_request_fails_clearly():
    model = tiny_vit()
    assert set_attention_backend(model, "auto") == "sdpa"
    with pytest.raises(RuntimeError, match="'xformers' was requested but .*use backend 'sdpa' or 'auto'"):
        set_attention_backend(model, "xformers")


def test_sdpa_backend_matches_explicit_softmax_attention():
    model = tiny_vit(qk_norm=True).eval()
    x = torch.randn(2, 1, 32, 24, generator=torch.Generator().manual_seed(1))
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = False  # timm's explicit softmax(q k^T * scale) v path
    with torch.no_grad():
        explicit = model.forward_features(x)
        assert set_attention_backend(model, "sdpa") == "sdpa"
        fused = model.forward_features(x)
    attention_modules = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attention_modules) == 2 and all(type(m) is Attention and m.fused_attn for m in attention_modules)
    for key in explicit:
        torch.testing.assert_close(fused[key], explicit[key], rtol=1e-4, atol=1e-5)


def test_unknown_backend_and_model_without_attention_are_rejected():
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend(tiny_vit(), "flash")
    with pytest.raises(ValueError, match="no timm Attention blocks"):
        set_attention_backend(torch.nn.Linear(2, 2), "sdpa")


@needs_xformers
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_xformers_matches_sdpa_outputs_and_gradients(qk_norm, dtype, tolerance):
    sdpa_model = tiny_vit(qk_norm=qk_norm).cuda().train()
    xformers_model = copy.deepcopy(sdpa_model)
    assert set_attention_backend(sdpa_model, "sdpa") == "sdpa"
    assert set_attention_backend(xformers_model, "xformers") == "xformers"
    assert all(type(m) is XFormersAttention for m in xformers_model.modules() if isinstance(m, Attention))

    generator = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(4, 1, 32, 40, device="cuda", generator=generator)
    masks = torch.rand(4, 20, device="cuda", generator=generator) < 0.3
    weights = {key: torch.randn(shape, device="cuda", generator=generator)
               for key, shape in (("cls", (4, 192)), ("patch", (4, 20, 192)), ("registers", (4, 4, 192)))}

    outputs = []
    for model in (sdpa_model, xformers_model):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = model.forward_features(x, masks)
            loss = sum((out[key].float() * weights[key]).sum() for key in weights)
        loss.backward()
        outputs.append(out)

    for key in weights:
        assert relative_error(outputs[1][key], outputs[0][key]) < tolerance, key
    sdpa_grads = dict(sdpa_model.named_parameters())
    for name, parameter in xformers_model.named_parameters():
        reference = sdpa_grads[name].grad
        assert relative_error(parameter.grad, reference) < tolerance, name
