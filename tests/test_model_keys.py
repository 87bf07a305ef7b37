"""LLaMA-Factory's model, adapter and Hub keys: QLoRA (bitsandbytes), DoRA / rsLoRA / LoRA+ / PiSSA,
rope_scaling, resize_vocab, flash_attn, and the Hugging Face Hub (model, adapter and reward-model ids
from a local hub cache offline, hf_hub_url datasets, push_to_hub / export_hub_model_id uploads).

Nothing here reaches the network: hub ids resolve from a hub-cache layout built in tmp_path with
HF_HUB_OFFLINE set, `datasets.load_dataset` and the upload calls are recorded by stand-ins.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import CPU, TINY_WIDEST, cpu_config, float32_tolerance, logit_bound, random_lora, requires, tiny_llama
from rlhfkit.cli import main
from rlhfkit.config import FinetuningArguments, ModelArguments, TrainingArguments
from rlhfkit.data import load_examples, resolve_datasets
from rlhfkit.errors import RlhfkitError
from rlhfkit.hub import push_folder, resolve_config_paths
from rlhfkit.models.adapters import lora_config, save_pissa_converted, save_pissa_init, setup_finetuning
from rlhfkit.models.loading import attn_implementation, load_causal_lm
from rlhfkit.models.rope import apply_rope_scaling
from rlhfkit.models.tiny import build_char_tokenizer
from rlhfkit.models.value_head import ValueHead
from rlhfkit.stages import run_stage
from rlhfkit.training.optim import build_optimizer, param_groups
from rlhfkit.training.runtime import build_accelerator

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install bitsandbytes); "
                                                   "the missing-package error is tested instead")
REVISION = "0123456789abcdef0123456789abcdef01234567"
SFT_ROWS = [{"instruction": f"say {w}", "output": w * 4} for w in "abcd"]


def _values(model_dir, tmp_path: Path, jsonl, **keys) -> dict:
    data = jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    return {"stage": "sft", "model_name_or_path": str(model_dir), "dataset": str(data),
            "output_dir": str(tmp_path / "out"), "max_steps": 1, "save_steps": 0, **keys}


def _one_line_error(capsys, tmp_path: Path, values: dict) -> str:
    """`rlhfkit train` on `values` exits 2 with one `error:` line and no traceback; that line."""
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"device": "cpu", **values}))
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------- validation

BASE = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o"}


@pytest.mark.parametrize("keys, fragment", [
    ({"quantization_bit": 4, "finetuning_type": "full"}, "quantization_bit needs finetuning_type: lora"),
    ({"quantization_bit": 4, "finetuning_type": "freeze"}, "quantization_bit needs finetuning_type: lora"),
    ({"quantization_bit": 3}, "quantization_bit must be 4 or 8"),
    ({"quantization_bit": 4, "quantization_method": "hqq"}, "quantization_method 'hqq' is not supported; use bnb"),
    ({"quantization_bit": 4, "quantization_type": "int4"}, "quantization_type is 'int4'; allowed: nf4, fp4"),
    ({"quantization_bit": 4, "resize_vocab": True}, "resize_vocab cannot resize"),
    ({"quantization_bit": 4, "pissa_init": True}, "pissa_init cannot initialise PiSSA"),
    ({"quantization_bit": 4, "adapter_name_or_path": "a,b"}, "a single adapter"),
    ({"ref_model_quantization_bit": 2}, "ref_model_quantization_bit must be 4 or 8"),
    ({"reward_model_quantization_bit": 16}, "reward_model_quantization_bit must be 4 or 8"),
    ({"use_dora": True, "finetuning_type": "full"}, "use_dora is only valid with finetuning_type: lora"),
    ({"loraplus_lr_ratio": 16.0, "finetuning_type": "freeze"}, "loraplus_lr_ratio is only valid"),
    ({"loraplus_lr_ratio": 0.0}, "loraplus_lr_ratio must be > 0"),
    ({"pissa_iter": -2}, "pissa_iter must be -1"),
    ({"flash_attn": "fa3"}, "flash_attn is 'fa3'; allowed: auto, disabled, sdpa, fa2"),
    ({"rope_scaling": "ntk"}, "rope_scaling is 'ntk'; allowed: linear, dynamic, yarn, llama3"),
])
def test_invalid_model_keys_name_the_key(keys, fragment):
    with pytest.raises(RlhfkitError, match=fragment.replace("(", r"\(")):
        cpu_config({**BASE, **keys})


def test_pissa_is_refused_for_ppo():
    with pytest.raises(RlhfkitError, match="pissa_init cannot be used with stage ppo"):
        cpu_config({**BASE, "stage": "ppo", "reward_model": "rm", "pissa_init": True})


def test_llamafactory_model_keys_are_accepted():
    config = cpu_config({**BASE, "quantization_bit": 4, "quantization_type": "fp4", "double_quantization": False,
                         "use_dora": True, "use_rslora": True, "loraplus_lr_ratio": 16, "flash_attn": "sdpa",
                         "rope_scaling": "linear", "cache_dir": "c", "model_revision": "v1", "hf_hub_token": "t",
                         "push_to_hub": True, "hub_model_id": "me/x"})
    assert (config.model.quantization_bit, config.model.quantization_type, config.finetuning.loraplus_lr_ratio) == \
        (4, "fp4", 16.0)


# ------------------------------------------------------------------------------------ QLoRA


def test_missing_bitsandbytes_is_one_line(capsys, tmp_path, tiny_model_dir, jsonl, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    line = _one_line_error(capsys, tmp_path, _values(tiny_model_dir, tmp_path, jsonl, quantization_bit=4))
    assert "quantization_bit needs the bitsandbytes package: pip install bitsandbytes" in line


@needs_bnb
def test_qlora_loads_4bit_and_trains_the_adapter(tiny_model_dir, tmp_path, jsonl):
    """4-bit nf4 with double quantization under the adapter; two steps move the (zero-initialised) B matrices."""
    import bitsandbytes as bnb

    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.stages.common import load_trainable_model

    config = cpu_config(_values(tiny_model_dir, tmp_path, jsonl, quantization_bit=4, max_steps=2,
                                learning_rate=1e-2))
    model = load_trainable_model(config, load_tokenizer(config.model), CPU)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    state = q_proj.base_layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantization: nested constants
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    run_stage(config)
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    b_norms = [float(t.abs().max()) for name, t in saved.items() if "lora_B" in name]
    assert b_norms and min(b_norms) > 0  # every B started at zero: gradients flowed through 4-bit layers


@needs_bnb
def test_qlora_ppo_with_dora_and_loraplus_runs(tiny_model_dir, tmp_path, jsonl, reward_functions):
    """PPO on a 4-bit base: the reference is the base with the adapter off, the rollout uses peft's
    forward on the quantized layers; the policy adapter trains."""
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"write {w}{i}"} for w in "abcd" for i in range(4)])
    run_stage(cpu_config({"stage": "ppo", "model_name_or_path": str(tiny_model_dir), "dataset": str(prompts),
                          "output_dir": str(tmp_path / "out"), "quantization_bit": 4, "use_dora": True,
                          "loraplus_lr_ratio": 4.0, "gradient_checkpointing": True, "learning_rate": 1e-2,
                          "per_device_train_batch_size": 8, "max_steps": 2, "max_new_tokens": 6,
                          "reward_model": f"{reward_functions}:letters", "reward_model_type": "function"}))
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert min(float(t.abs().max()) for name, t in saved.items() if "lora_B" in name) > 0


@needs_bnb
def test_reference_and_reward_models_load_quantized(tiny_model_dir, tmp_path):
    """ref_model_quantization_bit: 8 and reward_model_quantization_bit: 4 (a full reward model)."""
    import bitsandbytes as bnb

    from rlhfkit.stages.ppo_models import PPOModels, RewardSpec, _load_frozen, build_reward_source

    rm_dir = tmp_path / "rm"
    shutil.copytree(tiny_model_dir, rm_dir)
    ValueHead(64).save(rm_dir)
    config = cpu_config({**BASE, "stage": "ppo", "reward_model": str(rm_dir), "reward_model_type": "full",
                         "ref_model": str(tiny_model_dir), "ref_model_quantization_bit": 8,
                         "reward_model_quantization_bit": 4}, check=False)
    tokenizer = build_char_tokenizer()
    reference = _load_frozen(str(tiny_model_dir), config, torch.float32, CPU, tokenizer,
                             quantization_key="ref_model_quantization_bit")
    assert isinstance(reference.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    holder = PPOModels(policy=None, value_head=None, reference=None, reference_adapter="")
    reward = build_reward_source(RewardSpec(str(rm_dir), "full"), config, holder, tokenizer, torch.float32, CPU,
                                 shared_base_ok=False)
    assert isinstance(reward.model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)


# ---------------------------------------------------------------------------- LoRA variants


def test_lora_config_gets_the_variant_flags():
    config = lora_config(FinetuningArguments(use_dora=True, use_rslora=True, pissa_init=True))
    assert config.use_dora and config.use_rslora and config.init_lora_weights == "pissa_niter_16"
    assert lora_config(FinetuningArguments(pissa_init=True, pissa_iter=-1)).init_lora_weights == "pissa"
    plain = lora_config(FinetuningArguments())
    assert not plain.use_dora and not plain.use_rslora and plain.init_lora_weights is True


def test_rslora_scales_by_sqrt_rank_and_dora_trains_magnitudes(tiny_model_dir):
    args = FinetuningArguments(lora_rank=4, lora_alpha=16, use_rslora=True, use_dora=True, lora_target="q_proj")
    model = setup_finetuning(AutoModelForCausalLM.from_pretrained(tiny_model_dir), args, [])
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == 16 / math.sqrt(4)  # 8, where plain LoRA scales by 16 / 4
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in name for name in trainable)


def test_loraplus_b_matrices_learn_at_lr_times_ratio():
    """Groups: B at lr x ratio, A at lr. One AdamW step moves each weight by lr_group x |g| / (|g| + eps)
    (m and v bias-corrected are g and g^2 at the first step)."""
    model = random_lora(tiny_llama(50, seed=0), seed=1)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    args = TrainingArguments(learning_rate=1e-3, weight_decay=0.0, adam_epsilon=1e-8)
    finetuning = FinetuningArguments(loraplus_lr_ratio=16.0)
    groups = param_groups(named, args, finetuning)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, param in named:
        assert lr_of[id(param)] == (1e-3 * 16.0 if "lora_B" in name else 1e-3), name
    assert [g["lr"] for g in param_groups(named, args)] == [1e-3]  # no ratio: one group, as before
    before = {n: p.detach().clone() for n, p in named}
    optimizer = build_optimizer(named, args, finetuning)
    ids = torch.randint(0, 50, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in named}
    optimizer.step()
    for name, param in named:
        lr = 1e-3 * 16.0 if "lora_B" in name else 1e-3
        g = grads[name]
        expected = before[name] - lr * g / (g.abs() + 1e-8)
        tolerance = float32_tolerance(max(float(before[name].abs().max()), lr))
        assert torch.allclose(param.detach(), expected, rtol=0, atol=tolerance), name
        assert float((param.detach() - before[name]).abs().max()) > 0.5 * lr  # the step is many tolerances


def test_pissa_moves_the_principal_part_into_the_adapter(tiny_model_dir):
    """W_res + s B A = W (the function is unchanged at start) and W_res keeps only the singular values
    beyond the first r (exact SVD: pissa_iter -1)."""
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = FinetuningArguments(lora_rank=4, lora_target="q_proj", pissa_init=True, pissa_iter=-1)
    model = setup_finetuning(AutoModelForCausalLM.from_pretrained(tiny_model_dir), args, [])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight = original.model.layers[0].self_attn.q_proj.weight.detach()
    residual = layer.base_layer.weight.detach()
    a, b, scale = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    rebuilt = residual + scale * (b @ a)
    assert torch.allclose(rebuilt, weight, rtol=0, atol=float32_tolerance(weight, terms=4))
    singular = torch.linalg.svdvals(weight.double())  # the definition, in float64
    top_residual = torch.linalg.svdvals(residual.double())[0]
    tolerance = float32_tolerance(singular[0], terms=weight.shape[1])
    assert abs(float(top_residual - singular[4])) < tolerance < float(singular[3] - singular[4])


def test_pissa_convert_gives_a_lora_adapter_of_the_original_base(tiny_model_dir, tmp_path):
    """pissa_init saved before training; after (simulated) training the converted adapter on the
    untouched base computes what the trained PiSSA model computes."""
    args = FinetuningArguments(lora_rank=4, pissa_init=True, pissa_iter=-1, pissa_convert=True)
    model = setup_finetuning(AutoModelForCausalLM.from_pretrained(tiny_model_dir), args, [])
    save_pissa_init(model, tmp_path)
    torch.manual_seed(0)
    with torch.no_grad():  # "training"
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    ids = torch.tensor([[5, 17, 40, 33, 8, 61]])
    trained = model(input_ids=ids).logits.detach()
    converted = save_pissa_converted(model, tmp_path)
    assert json.loads((converted / "adapter_config.json").read_text())["r"] == 8
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    untouched = base(input_ids=ids).logits.detach()
    tolerance = float32_tolerance(logit_bound(base), TINY_WIDEST)  # LoRA leaves the norm and LM head alone
    reloaded = PeftModel.from_pretrained(base, converted)(input_ids=ids).logits.detach()
    assert torch.allclose(reloaded, trained, rtol=0, atol=tolerance)
    assert float((untouched - trained).abs().max()) > 100 * tolerance


# ---------------------------------------------------------------------- RoPE and vocabulary


@pytest.mark.parametrize("method, extra", [
    ("linear", {}),
    ("dynamic", {"original_max_position_embeddings": 512}),
    ("yarn", {"original_max_position_embeddings": 512}),
    ("llama3", {"original_max_position_embeddings": 512, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
])
def test_rope_scaling_factor_as_llamafactory_computes_it(method, extra):
    config = LlamaConfig(max_position_embeddings=512, rope_theta=10000.0)
    apply_rope_scaling(config, method, max_length=1200)  # ceil(1200 / 512) = 3
    params = config.rope_parameters
    assert {k: v for k, v in params.items() if k != "rope_theta"} == {"rope_type": method, "factor": 3.0, **extra}
    assert params["rope_theta"] == 10000.0 and config.max_position_embeddings == 1536


def test_rope_scaling_off_when_cutoff_fits_and_two_outside_training():
    config = LlamaConfig(max_position_embeddings=512)
    apply_rope_scaling(config, "linear", max_length=512)
    assert config.rope_parameters["rope_type"] == "default" and config.max_position_embeddings == 512
    apply_rope_scaling(config, "linear", max_length=None)
    assert config.rope_parameters["factor"] == 2.0 and config.max_position_embeddings == 1024


def test_linear_rope_scaling_divides_the_frequencies(tiny_model_dir):
    """The loaded model's inverse frequencies are theta^(-2i/d) / factor (the definition of linear scaling)."""
    model = load_causal_lm(str(tiny_model_dir), ModelArguments(rope_scaling="linear"), torch.float32, CPU,
                           max_length=1200)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    theta = model.config.rope_parameters["rope_theta"]
    expected = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim) / 3.0
    inv_freq = model.model.rotary_emb.inv_freq.double()
    assert torch.allclose(inv_freq, expected, rtol=float32_tolerance(1.0, 2), atol=0)


def test_resize_vocab_pads_to_64_and_trains_tied_embeddings(tiny_model_dir):
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens([f"<new{i}>" for i in range(5)])  # 105 tokens
    plain = load_causal_lm(str(tiny_model_dir), ModelArguments(), torch.float32, CPU, tokenizer)
    assert plain.get_input_embeddings().weight.shape[0] == 105
    model = load_causal_lm(str(tiny_model_dir), ModelArguments(resize_vocab=True), torch.float32, CPU, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == 128
    peft = setup_finetuning(model, FinetuningArguments(), [], resize_vocab=True)
    inner = peft.base_model.model
    embed, head = inner.model.embed_tokens.modules_to_save["default"], inner.lm_head.modules_to_save["default"]
    assert embed.weight.requires_grad and head.weight is embed.weight  # trained, and still tied


# ----------------------------------------------------------------------------- attention


def test_flash_attn_names_map_onto_kernels():
    assert attn_implementation(ModelArguments(flash_attn="disabled")) == "eager"
    assert attn_implementation(ModelArguments(flash_attn="sdpa")) == "sdpa"
    assert attn_implementation(ModelArguments(flash_attn="auto")) is None
    assert attn_implementation(ModelArguments(flash_attn="fa2", attn_implementation="sdpa")) == "sdpa"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available(),
                    reason="flash-attn is usable here")
@pytest.mark.parametrize("keys, fragment", [
    ({"flash_attn": "fa2"}, "flash_attn: fa2 needs the flash-attn package"),
    ({"attn_implementation": "flash_attention_2"}, "attn_implementation: flash_attention_2 needs the flash-attn"),
])
def test_flash_attention_without_the_package_is_one_line(capsys, tmp_path, tiny_model_dir, jsonl, keys, fragment):
    line = _one_line_error(capsys, tmp_path, _values(tiny_model_dir, tmp_path, jsonl, **keys))
    assert fragment in line and "pip install flash-attn" in line and "sdpa" in line


# ------------------------------------------------------------------------------------- Hub


def _cache(cache: Path, repo_id: str, source: Path) -> Path:
    """`source` as the main revision of `repo_id` in a Hugging Face hub cache at `cache`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for huggingface_hub and datasets (both read it when imported)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if importlib.util.find_spec("datasets") is not None:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture
def uploads(monkeypatch) -> list:
    """Record HfApi.create_repo / upload_folder calls instead of making them."""
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
                        or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw)))
    return calls


def test_hub_ids_resolve_from_the_cache_offline(tiny_model_dir, tmp_path, offline):
    cache = tmp_path / "hub"
    model = _cache(cache, "org/tiny", tiny_model_dir)
    adapter = _cache(cache, "org/tiny-lora", tiny_model_dir)
    reward = _cache(cache, "org/tiny-rm", tiny_model_dir)
    config = cpu_config({**BASE, "stage": "ppo", "model_name_or_path": "org/tiny", "adapter_name_or_path": "org/tiny-lora",
                         "reward_model": "org/tiny-rm", "reward_model_type": "full", "cache_dir": str(cache)})
    resolve_config_paths(config)
    assert (config.model.model_name_or_path, config.model.adapter_name_or_path, config.ppo.reward_model) == \
        (str(model), str(adapter), str(reward))
    pinned = cpu_config({**BASE, "model_name_or_path": "org/tiny", "cache_dir": str(cache), "model_revision": REVISION})
    resolve_config_paths(pinned)
    assert pinned.model.model_name_or_path == str(model)


def test_sft_from_a_hub_id_records_the_id_and_pushes(tiny_model_dir, tmp_path, jsonl, offline, uploads):
    cache = tmp_path / "hub"
    _cache(cache, "org/tiny", tiny_model_dir)
    values = _values("org/tiny", tmp_path, jsonl, cache_dir=str(cache), push_to_hub=True, hub_model_id="me/tiny-sft",
                     hf_hub_token="hf_test", hub_private_repo=True)
    run_stage(cpu_config(values))
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "org/tiny"
    (_, created, create_kw), (_, uploaded, upload_kw) = uploads
    assert created == uploaded == "me/tiny-sft" and create_kw["private"] is True
    assert upload_kw["folder_path"] == str(tmp_path / "out") and "checkpoint-*" in upload_kw["ignore_patterns"]


def test_offline_uncached_model_is_one_line(capsys, tmp_path, tiny_model_dir, jsonl, offline):
    values = _values("org/missing", tmp_path, jsonl, cache_dir=str(tmp_path / "empty"))
    line = _one_line_error(capsys, tmp_path, values)
    assert "model_name_or_path 'org/missing'" in line and "hf download org/missing" in line and "local folder" in line


@requires("datasets")
def test_hf_hub_url_dataset_goes_through_load_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def load_dataset(**kwargs):
        calls.append(kwargs)
        return [{"instruction": "say a", "output": "aaaa"}, {"instruction": "say b", "output": "bbbb"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"hubset": {"hf_hub_url": "org/data", "subset": "en", "split": "validation", "folder": "v1"}}))
    specs = resolve_datasets("hubset", str(tmp_path), cache_dir="cache", token="hf_test")
    examples = load_examples(specs, "sft")
    assert calls == [{"path": "org/data", "name": "en", "data_dir": "v1", "split": "validation", "cache_dir": "cache",
                      "token": "hf_test"}]
    assert [m["content"] for m in examples[1].messages] == ["say b", "bbbb"]


@requires("datasets")
def test_hf_hub_url_dataset_offline_is_one_line(tmp_path, offline):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"hubset": {"hf_hub_url": "org/never-cached"}}))
    specs = resolve_datasets("hubset", str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RlhfkitError) as err:
        load_examples(specs, "sft")
    message = str(err.value)
    assert "'org/never-cached'" in message and "hf download org/never-cached --repo-type dataset" in message
    assert "\n" not in message


def test_export_uploads_to_export_hub_model_id(tiny_model_dir, tmp_path, uploads):
    from rlhfkit.commands.export import run_export

    export_dir = tmp_path / "exported"
    run_export(cpu_config({"model_name_or_path": str(tiny_model_dir), "export_dir": str(export_dir),
                           "export_hub_model_id": "me/tiny-export", "hf_hub_token": "hf_test"}, check=False))
    assert [(kind, repo) for kind, repo, _ in uploads] == [("create", "me/tiny-export"), ("upload", "me/tiny-export")]
    assert uploads[1][2]["folder_path"] == str(export_dir)


def test_push_offline_is_one_line(tmp_path, offline):
    with pytest.raises(RlhfkitError) as err:
        push_folder(tmp_path, "me/x", None, "hub_model_id")
    assert "'me/x'" in str(err.value) and "hf upload me/x" in str(err.value) and "\n" not in str(err.value)


def test_tf32_is_a_cuda_switch_that_leaves_other_devices_alone(caplog):
    """`tf32: true` on the CPU changes no global setting (it applies to CUDA products only) and says so."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    config = cpu_config({**BASE, "tf32": True})
    assert config.training.tf32 is True and cpu_config(BASE).training.tf32 is None
    with caplog.at_level(logging.INFO, logger="rlhfkit.accelerator.matmul"):
        build_accelerator(config)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert "tf32: True applies to CUDA devices only" in caplog.text
    with pytest.raises(RlhfkitError, match="tf32"):
        cpu_config({**BASE, "tf32": "fast"})
