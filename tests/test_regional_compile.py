"""Regional torch.compile (engine/patches/regional_compile.py): each decoder layer compiled gives the eager loss and
gradients, batches of new lengths reuse the graph, and the layers run eagerly again afterwards."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from llm_mcp.engine.patches.regional_compile import compiled_layers, decoder_layers


def _loss_and_grads(model, length: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    ids = (torch.arange(4 * length).reshape(4, length) * 7) % 400 + 5
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_layers_match_eager_and_are_undone(tiny_model):
    import torch._dynamo.utils as dynamo_utils

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    model.train()
    eager = {length: _loss_and_grads(model, length) for length in (40, 57)}
    dynamo_utils.counters.clear()
    with compiled_layers(model) as count:
        assert count == len(decoder_layers(model)) == 2
        compiled = {length: _loss_and_grads(model, length) for length in (40, 57)}
        assert dynamo_utils.counters["stats"]["unique_graphs"] >= 1  # really compiled
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    for length, (loss, grads) in eager.items():
        assert compiled[length][0] == pytest.approx(loss, rel=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(compiled[length][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
