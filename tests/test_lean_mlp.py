"""The fused LoRA SwiGLU MLP (engine/patches/lean_mlp.py) against peft's op-by-op MLP: the same loss and gradients from
the same seed (float32 exactly, NF4 up to bf16 rounding), fewer bytes kept for the backward pass, peft's forward
wherever it does not apply (eval, no grad, autocast), and everything restored afterwards."""

from __future__ import annotations


import pytest
import torch

from llm_mcp.config import LoadConfig
from llm_mcp.engine.patches.lean_lora import lean_lora_dropout
from llm_mcp.engine.patches.lean_mlp import lean_mlp
from llm_mcp.engine.load.model import load_model


@pytest.fixture(scope="module", params=["none", "nf4"])
def lora_model(request, tiny_model):
    """The tiny model with LoRA (dropout 0.1) on all projections, B initialised so every gradient is non-zero; over
    NF4 the adapters are bf16, as in training."""
    dtype = "float32" if request.param == "none" else "bfloat16"  # nf4: bitsandbytes computes in bf16
    bundle = load_model(LoadConfig(model_name=str(tiny_model), max_length=128, lora_rank=8, lora_dropout=0.1,
                                   quant_type=request.param, compute_dtype=dtype))
    torch.manual_seed(0)
    for name, param in bundle.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
        if "lora_" in name and request.param == "nf4":
            param.data = param.data.to(torch.bfloat16)  # as TRL's SFTTrainer keeps QLoRA adapters
    bundle.model.train()
    return request.param, bundle.model


def test_same_loss_and_gradients_with_less_memory(lora_model, lora_step):
    quant, model = lora_model
    loss, grads, plain_bytes = lora_step(model, [lean_lora_dropout])
    for order in ([lean_mlp, lean_lora_dropout], [lean_lora_dropout, lean_mlp]):
        fused_loss, fused_grads, fused_bytes = lora_step(model, order)
        assert fused_loss == pytest.approx(loss, rel=1e-6 if quant == "none" else 1e-4)
        assert fused_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert grad.abs().sum() > 0, name
            error = ((fused_grads[name] - grad).norm() / grad.norm()).item()
            # float32: reassociation only; nf4: bf16 base gradients and adapters, where 1e-7 differences flip roundings
            assert error < (1e-5 if quant == "none" else 2e-2), (name, error)
        # no longer kept: silu(gate) in float32 and silu(gate) * up (float32, or its bf16 copy for bf16 adapters),
        # per token and layer
        config = model.config
        per_token = config.intermediate_size * (4 + (4 if quant == "none" else 2))
        assert plain_bytes - fused_bytes >= 4 * 48 * per_token * config.num_hidden_layers, (plain_bytes, fused_bytes)


def test_applies_only_while_training_with_grad(lora_model):
    _, model = lora_model
    ids = (torch.arange(2 * 16).reshape(2, 16) + 5).to(model.device)
    mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]
    with lean_mlp(model) as fused:
        assert fused == len(mlps) == 2
        model.eval()
        with torch.no_grad():
            eval_logits = model(input_ids=ids).logits
        model.train()
        with torch.autocast(model.device.type, dtype=torch.bfloat16):  # autocast: peft's forward
            autocast_loss = model(input_ids=ids, labels=ids).loss
        assert autocast_loss.grad_fn is not None
    assert all("forward" not in vars(m) for m in mlps)  # the class's forward again
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, eval_logits)
    model.train()


def test_other_mlps_are_left_alone(tiny_model):
    """LoRA on part of the MLP only: nothing to fuse, nothing changed."""
    bundle = load_model(LoadConfig(model_name=str(tiny_model), max_length=64, lora_rank=4, quant_type="none",
                                   compute_dtype="float32", target_modules=("q_proj", "down_proj")))
    with lean_mlp(bundle.model) as fused:
        assert fused == 0
