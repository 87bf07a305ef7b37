"""`rlhfkit export`: merged weights reproduce base + adapter, sharding, tokenizer and generation config,
chat template of a built-in template, the value head kept out of the LM, export_dir's run lock (never
shipped), and clean errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import TINY_HIDDEN, cpu_config, float32_tolerance, hold_output_lock, one_error_line, write_cpu_config
from rlhfkit.cli import main
from rlhfkit.commands.export import _check_only_base_tensors, builtin_chat_template, run_export
from rlhfkit.data import TEMPLATES
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.tiny import build_char_tokenizer
from rlhfkit.models.value_head import VALUE_HEAD_FILE, ValueHead
from rlhfkit.run_lock import LOCK_FILE

TEXTS = ["<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "abc xyz 123"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, saved with the tokenizer like a stage output."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapter") / "sft"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits * batch["attention_mask"][..., None]


@torch.no_grad()
def _merged_logits_atol(reference_model, batch) -> float:
    """Tolerance between merged and on-the-fly LoRA logits (both float32: export writes no float64).

    Merging rounds each weight once more, an error of the size of a product's own rounding, which
    reaches the logits through the LM head's sum: `float32_tolerance` of that sum's summands
    |h_i e_ki|, over the network's widest layer (see conftest)."""
    hidden = reference_model.eval()(**batch, output_hidden_states=True).hidden_states[-1]  # (b, T, H), normed
    head = reference_model.get_output_embeddings().weight  # (v, H)
    summands = (hidden.abs() @ head.abs().t()) * batch["attention_mask"][..., None]
    return float32_tolerance(summands, reference_model.config.intermediate_size)


def _export(tmp_path, tiny_model_dir, adapter_dir=None, **keys) -> Path:
    values = {"model_name_or_path": str(tiny_model_dir), "export_dir": str(tmp_path / "exported"), **keys}
    if adapter_dir is not None:
        values["adapter_name_or_path"] = str(adapter_dir)
    return run_export(cpu_config(values, check=False))


def test_cli_round_trip_logits_match_base_plus_adapter(tiny_model_dir, adapter_dir, tmp_path):
    config = tmp_path / "export.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\nadapter_name_or_path: {adapter_dir}\n"
                      f"template: auto\nexport_dir: {tmp_path / 'out'}\nexport_size: 5\nexport_legacy_format: false\n")
    result = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "export", str(config)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = _batch(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = _logits(base, batch)
    reference_model = PeftModel.from_pretrained(base, adapter_dir)
    reference = _logits(reference_model, batch)
    merged = _logits(AutoModelForCausalLM.from_pretrained(out), batch)
    assert (reference - base_logits).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(merged, reference, atol=_merged_logits_atol(reference_model, batch), rtol=0)
    # Exactly the base model's tensors (tied output embedding not duplicated), none of LoRA's.
    base_names = set(load_file(str(tiny_model_dir / "model.safetensors")))
    assert set(load_file(str(out / "model.safetensors"))) == base_names
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == 2 and generation.pad_token_id == 0
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template


def test_sharded_export_loads_and_matches(tiny_model_dir, adapter_dir, tmp_path):
    out = _export(tmp_path, tiny_model_dir, adapter_dir, export_size=0.0001)  # 100 kB per file
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == set(shards)
    assert all((out / s).stat().st_size < 250_000 for s in shards)
    batch = _batch(AutoTokenizer.from_pretrained(out))
    reference_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    reference = _logits(reference_model, batch)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), batch), reference,
                               atol=_merged_logits_atol(reference_model, batch), rtol=0)


@pytest.mark.parametrize("key", ["torch_dtype", "infer_dtype"])  # infer_dtype: LLaMA-Factory's merge configs
def test_dtype_and_plain_reexport(tiny_model_dir, tmp_path, key):
    out = _export(tmp_path, tiny_model_dir, **{key: "bfloat16"})
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for name, tensor in load_file(str(out / "model.safetensors")).items():
        assert torch.equal(tensor, original[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_builtin_template_becomes_an_equivalent_chat_template(name):
    tokenizer = build_char_tokenizer()
    template = TEMPLATES[name]
    tokenizer.chat_template = builtin_chat_template(template, tokenizer)
    conversations = [
        [{"role": "user", "content": "it's \"quoted\"\nand {braces}"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    ]
    for messages in conversations:
        for system in (None, "be brief"):
            full = ([{"role": "system", "content": system}] if system else []) + messages
            rendered = tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=True)
            assert rendered == template.render(tokenizer, messages, system), (name, messages, system)


def test_template_key_writes_chat_template_and_stop_tokens(tiny_model_dir, tmp_path):
    out = _export(tmp_path, tiny_model_dir, template="default")
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    # LLaMA-Factory's default format: EOS after the user text and after the reply.
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "Human: hi<|im_end|>\nAssistant:yo<|im_end|>\n"
    assert GenerationConfig.from_pretrained(out).eos_token_id == 2


def test_value_head_never_enters_the_lm(tiny_model_dir, adapter_dir, tmp_path):
    rm_dir = tmp_path / "rm"
    for path in adapter_dir.iterdir():
        (rm_dir / path.name).parent.mkdir(exist_ok=True)
        (rm_dir / path.name).write_bytes(path.read_bytes())
    ValueHead(TINY_HIDDEN, zero_init=False).save(rm_dir)
    base_names = set(load_file(str(tiny_model_dir / "model.safetensors")))
    # A policy export leaves the (critic) head out entirely.
    policy = _export(tmp_path / "a", tiny_model_dir, rm_dir)
    assert not (policy / VALUE_HEAD_FILE).exists()
    assert set(load_file(str(policy / "model.safetensors"))) == base_names
    # stage: rm keeps the reward head, beside the LM (the layout reward_model_type: full reads).
    reward = _export(tmp_path / "b", tiny_model_dir, rm_dir, stage="rm")
    # Same tensors, bit for bit (the file's bytes are not compared: safetensors writes its metadata
    # map in a per-process order).
    exported, trained = load_file(str(reward / VALUE_HEAD_FILE)), load_file(str(rm_dir / VALUE_HEAD_FILE))
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert set(load_file(str(reward / "model.safetensors"))) == base_names
    # A model that carries a head as a submodule is refused.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = set(model.state_dict())
    model.v_head = ValueHead(TINY_HIDDEN)
    with pytest.raises(RlhfkitError, match="refusing to export.*v_head.summary"):
        _check_only_base_tensors(model, expected, [str(rm_dir)])


@pytest.mark.parametrize("keys, fragment", [
    ({"export_dir": None}, "export_dir is required"),
    ({"export_legacy_format": True}, "export_legacy_format: true"),
    ({"export_size": 0}, "export_size must be > 0"),
    ({"export_device": "gpu"}, "allowed: cpu, auto"),
    ({"stage": "rm"}, "value_head.safetensors does not exist"),
])
def test_bad_export_config(tiny_model_dir, adapter_dir, tmp_path, keys, fragment):
    with pytest.raises(RlhfkitError, match=fragment.replace("(", r"\(")):
        _export(tmp_path, tiny_model_dir, adapter_dir, **keys)
    assert not (tmp_path / "exported").exists()


def test_refuses_to_overwrite(tiny_model_dir, adapter_dir, tmp_path):
    with pytest.raises(RlhfkitError, match="is one of the folders being read"):
        _export(tmp_path, tiny_model_dir, adapter_dir, export_dir=str(adapter_dir))
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "keep.txt").write_text("x")
    with pytest.raises(RlhfkitError, match="is not empty; set overwrite_output_dir"):
        _export(tmp_path, tiny_model_dir, adapter_dir)
    _export(tmp_path, tiny_model_dir, adapter_dir, overwrite_output_dir=True)
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_llamafactory_merge_config_runs_unchanged_but_for_paths(tiny_model_dir, adapter_dir, tmp_path):
    """LLaMA-Factory's merge_lora example, its layout and keys as they are (a template we have)."""
    config = tmp_path / "merge.yaml"
    config.write_text(f"""### Note: DO NOT use quantized model or quantization_bit when merging lora adapters

### model
model_name_or_path: {tiny_model_dir}
adapter_name_or_path: {adapter_dir}
template: chatml
trust_remote_code: true

### export
export_dir: {tmp_path / 'merged'}
export_size: 5
export_device: cpu  # choices: [cpu, auto]
export_legacy_format: false
""")
    assert main(["export", str(config)]) == 0
    out = tmp_path / "merged"
    batch = _batch(AutoTokenizer.from_pretrained(out))
    reference_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), batch),
                               _logits(reference_model, batch), atol=_merged_logits_atol(reference_model, batch),
                               rtol=0)
    messages = [{"role": "user", "content": "hi"}]
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(messages, tokenize=False) == \
        TEMPLATES["chatml"].render(build_char_tokenizer(), messages)


def test_reward_model_with_the_head_inside_its_weights_exports_to_the_shared_layout(tiny_model_dir, tmp_path):
    """A full reward model saved by TRL (v_head.* among the LM's weights) exports as the LM alone plus
    value_head.safetensors in LLaMA-Factory's key names."""
    trl = tmp_path / "trl"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    head = ValueHead(TINY_HIDDEN, zero_init=False)
    model.save_pretrained(trl, state_dict={**model.state_dict(),
                                           **{f"v_head.{k}": v for k, v in head.state_dict().items()}})
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(trl)
    out = _export(tmp_path, trl, stage="rm")
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(tiny_model_dir / "model.safetensors")))
    saved = load_file(str(out / VALUE_HEAD_FILE))
    assert set(saved) == {"v_head.summary.weight", "v_head.summary.bias"}
    assert torch.equal(saved["v_head.summary.weight"], head.summary.weight)


# ------------------------------------------------------------------------------ one run per export_dir

EXPORTED = ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"]


def _export_cli(capsys, tmp_path, tiny_model_dir, out) -> tuple[int, str]:
    """`rlhfkit export` of the plain tiny model in this process into `out`; (exit status, stderr)."""
    config = write_cpu_config(tmp_path / "export.yaml", {"model_name_or_path": str(tiny_model_dir),
                                                         "export_dir": str(out)})
    code = main(["export", str(config)])
    return code, capsys.readouterr().err


def test_export_into_a_locked_export_dir_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold_output_lock(out)  # as another export, or a training run into `out`, holds it
    try:
        code, err = _export_cli(capsys, tmp_path, tiny_model_dir, out)
        assert code == 2
        line = one_error_line(err)
        assert f"export_dir {out} is in use by another run" in line and f"process {holder.pid}" in line
        assert line.endswith("choose another export_dir")
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # nothing written
    finally:
        holder.communicate("", timeout=30)
    code, err = _export_cli(capsys, tmp_path, tiny_model_dir, out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == EXPORTED  # its own lock released


def test_export_takes_over_a_lock_left_by_a_killed_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold_output_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    code, err = _export_cli(capsys, tmp_path, tiny_model_dir, out)
    assert code == 0, err  # the stale lock file does not make the folder "not empty"
    assert f"left by process {holder.pid}" in err and "taking it over" in err
    assert sorted(p.name for p in out.iterdir()) == EXPORTED


def test_the_upload_never_ships_the_lock(tiny_model_dir, tmp_path, monkeypatch):
    """export_dir's lock is held while it uploads; the files huggingface_hub's filter lets through exclude it."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    uploaded = {}

    def upload_folder(self, *, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        present = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        uploaded["present"] = present
        uploaded["shipped"] = list(filter_repo_objects(present, allow_patterns=allow_patterns,
                                                       ignore_patterns=ignore_patterns))

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = _export(tmp_path, tiny_model_dir, export_hub_model_id="me/tiny-export")
    assert LOCK_FILE in uploaded["present"]
    assert sorted(uploaded["shipped"]) == EXPORTED
    assert sorted(p.name for p in out.iterdir()) == EXPORTED


def test_export_refuses_a_multi_process_launch(tiny_model_dir, tmp_path, monkeypatch):
    """export runs in one process: every process of a launch would write the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RlhfkitError, match=r"rlhfkit export runs in one process.*WORLD_SIZE=2"):
        _export(tmp_path, tiny_model_dir)
    assert not (tmp_path / "exported").exists()
