"""`lean_lora_decoding`: the plain LoRA layers' lean forward equals PEFT's and is undone afterwards."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import float64_tolerance
from rlhfkit.cpu.lora_decoding import lean_lora_decoding

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _lora_model(model_dir, dtype=torch.float32, **config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                                             **config))
    model.to(dtype).eval()
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_lean_forward_equals_peft_and_is_removed_afterwards(tiny_model_dir):
    """Float64: the lean forward sums base + scale * (x A^T) B^T in another order than PEFT's."""
    model = _lora_model(tiny_model_dir, torch.float64)
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, 60, (3, 7), generator=torch.Generator().manual_seed(1))
    expected = _logits(model, ids)
    with model.disable_adapter():
        without_adapter = _logits(model, ids)
    assert not torch.allclose(expected, without_adapter, atol=1e-3)  # the adapter matters here
    with lean_lora_decoding(model) as patched:
        assert patched == len(TARGETS) * layers
        got = _logits(model, ids)
    # float64 rounding of logits this large, through layers whose longest sum is the MLP's width
    atol = float64_tolerance(expected, model.config.intermediate_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    assert not any("forward" in vars(module) for module in model.modules())
    assert torch.equal(_logits(model, ids), expected)  # PEFT's forward is back


def test_layers_outside_the_plain_case_keep_peft_forward(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    with model.disable_adapter(), lean_lora_decoding(model) as patched:
        assert patched == 0
    dora = _lora_model(tiny_model_dir, use_dora=True)
    with lean_lora_decoding(dora) as patched:
        assert patched == 0
    dropout = _lora_model(tiny_model_dir, lora_dropout=0.1)
    dropout.train()
    with lean_lora_decoding(dropout) as patched:
        assert patched == 0
    dropout.eval()  # dropout is inactive in eval mode
    with lean_lora_decoding(dropout) as patched:
        assert patched == len(TARGETS) * dropout.config.num_hidden_layers
