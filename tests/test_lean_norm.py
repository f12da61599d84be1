"""The closed-form RMSNorm (engine/patches/lean_norm.py) against transformers' op-by-op RMSNorm: the same outputs, loss and
gradients on the tiny model, no more bytes kept, transformers' forward wherever it does not apply (eval, no grad,
autocast, bf16), and everything restored afterwards."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llm_mcp.config import LoadConfig
from llm_mcp.engine.patches.lean_norm import lean_rmsnorm
from llm_mcp.engine.load.model import load_model


def _norm_step(norm: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().requires_grad_()
    norm.zero_grad(set_to_none=True)
    out = norm(x)
    out.backward(grad)
    return out.detach(), x.grad, norm.weight.grad


def test_one_norm_matches_transformers_including_the_weight_gradient():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    x, grad = torch.randn(3, 17, 96) * 3, torch.randn(3, 17, 96)
    ref = _norm_step(norm, x, grad)
    with lean_rmsnorm(norm) as swapped:
        assert swapped == 1
        lean = _norm_step(norm, x, grad)
    assert torch.equal(lean[0], ref[0])  # the forward is transformers' own ops: the same bits
    torch.testing.assert_close(lean[1], ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean[2], ref[2], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lora_model(tiny_model):
    bundle = load_model(LoadConfig(model_name=str(tiny_model), max_length=128, lora_rank=8, quant_type="none",
                                   compute_dtype="float32"))
    torch.manual_seed(0)
    for name, param in bundle.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    bundle.model.train()
    return bundle.model


def test_model_trains_to_the_same_gradients(lora_model, lora_step):
    loss, grads, plain_bytes = lora_step(lora_model, [])
    with lean_rmsnorm(lora_model) as swapped:
        assert swapped == 2 * lora_model.config.num_hidden_layers + 1  # two per layer and the final norm
    lean_loss, lean_grads, lean_bytes = lora_step(lora_model, [lean_rmsnorm])  # dropout: the same seed
    assert lean_loss == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert lean_bytes <= plain_bytes  # x, 1/rms and the weight, as autograd keeps for a frozen norm
    assert all("forward" not in vars(m) for m in lora_model.modules())  # restored: the class's forward again


def test_eval_no_grad_autocast_and_bf16_keep_transformers_forward():
    norm = LlamaRMSNorm(32)
    x = torch.randn(2, 5, 32, requires_grad=True)
    with lean_rmsnorm(norm):
        assert "_RMSNorm" in type(norm(x).grad_fn).__name__
        with torch.no_grad():
            assert norm(x).grad_fn is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert "_RMSNorm" not in type(norm(x).grad_fn).__name__
        assert "_RMSNorm" not in type(norm(x.to(torch.bfloat16)).grad_fn).__name__
        norm.eval()
        assert "_RMSNorm" not in type(norm(x).grad_fn).__name__
