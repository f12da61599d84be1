"""Generation multiplies with float copies of the 4-bit weights (engine/patches/float_weights.py), dequantized once
per call instead of once per token: the same logits and answers as bitsandbytes' own path, copies freed after, and
not made where they would not fit."""

from __future__ import annotations

import pytest
import torch

from conftest import FAST_LOAD
from llm_mcp.config import GenerationConfig, LoadConfig
from llm_mcp.engine.infer import generate as generate_module
from llm_mcp.engine.load.model import load_model
from llm_mcp.engine.patches.float_weights import copy_bytes, fits, float_weights, four_bit_layers


@pytest.fixture(scope="module")
def bundle(tiny_model):
    return load_model(LoadConfig(model_name=str(tiny_model), **{**FAST_LOAD, "compute_dtype": "bfloat16"}))


def test_the_copies_give_bitsandbytes_logits_and_are_freed(bundle):
    model = bundle.model.eval()
    layers = four_bit_layers(model)
    assert len(layers) == 2 * 7  # every projection of the tiny model's two layers is 4-bit
    ids = torch.tensor([[1, 5, 9, 14, 30, 2, 7]], device=model.device)
    with torch.no_grad():
        expected = model(ids).logits
        with float_weights(model) as patched:
            assert patched == len(layers) and all("forward" in vars(layer) for layer in layers)
            got = model(ids).logits
    assert not any("forward" in vars(layer) for layer in layers)  # bitsandbytes' forward again
    # the same dequantized bf16 values multiplied in bf16: equal up to the matmul's summation order
    assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2), (got - expected).abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_the_lora_layers_over_them_add_the_same_adapter_output(bundle):
    """With a trained-like adapter (B no longer zero), peft's LoRA layers run the copy's product plus the adapter's
    in one step: the same logits as peft's own forward, with the adapter on and off."""
    model = bundle.model.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    wrappers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    ids = torch.tensor([[1, 5, 9, 14, 30, 2, 7]], device=model.device)
    with torch.no_grad():
        for adapter_on in (True, False):
            with model.disable_adapter() if not adapter_on else torch.no_grad():
                expected = model(ids).logits
                with float_weights(model):
                    assert all("forward" in vars(w) for w in wrappers) is adapter_on  # off: peft's own
                    got = model(ids).logits
            assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2), (adapter_on, (got - expected).abs().max())
        with float_weights(model):
            with_adapter = model(ids).logits
        with model.disable_adapter():
            without = model(ids).logits
    assert (with_adapter - without).abs().max() > 0.05  # the adapter really moved the logits
    assert not any("forward" in vars(w) for w in wrappers)


def test_generate_answers_the_same_with_and_without_copies(bundle, monkeypatch):
    config = GenerationConfig(prompt="What is the capital of Zorbland?", max_new_tokens=12)
    with_copies = generate_module.generate(bundle, config)
    monkeypatch.setattr(generate_module, "fits", lambda model, free: False)
    without = generate_module.generate(bundle, config)
    assert with_copies["text"] == without["text"] and with_copies["completion_tokens"] == without["completion_tokens"]


def test_copies_only_where_they_fit(bundle):
    needed = copy_bytes(bundle.model)
    assert needed == sum(layer.in_features * layer.out_features * 2 for layer in four_bit_layers(bundle.model))
    assert fits(bundle.model, 8 * needed) and not fits(bundle.model, 2 * needed) and not fits(bundle.model, None)
