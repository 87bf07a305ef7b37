"""`rlhfkit export CONFIG.yaml [key=value ...]`: merge LoRA adapters into their base, save a standalone model.

Keys (LLaMA-Factory's): `model_name_or_path`, `adapter_name_or_path` (merged in order; folders
or hub ids), `template`, `export_dir`, `export_size`, `export_legacy_format`, `export_device`,
`export_hub_model_id` (upload the result), and `torch_dtype` (or LLaMA-Factory's `infer_dtype`) /
`bf16` / `fp16` for the saved dtype (auto keeps the checkpoint's).

1. check     required keys, sizes, that export_dir is not a source; export_dir's lock taken (held
             to the end, as a training run holds output_dir's), then that it is empty
2. load      tokenizer (from the last adapter folder if it holds one) and base model; grow the
             embeddings if the tokenizer gained tokens during training
3. merge     each adapter into the weights; the result must hold exactly the base architecture's
             tensors, so a value head (or a left-over LoRA tensor) can never reach the LM's files
4. describe  chat template of a built-in `template` written into the tokenizer; the template's
             stop tokens and PAD written into the generation config
5. save      safetensors shards of at most export_size GB (with an index when sharded),
             tokenizer, generation config; with `stage: rm` the value head goes beside the
             model as value_head.safetensors (LLaMA-Factory's key names), the layout
             `reward_model_type: full` reads
6. upload    with `export_hub_model_id`, export_dir to that Hugging Face Hub repository
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from transformers import AutoTokenizer

from rlhfkit.commands.inference import inference_device, tokenizer_folder
from rlhfkit.config import Config
from rlhfkit.data import template_for
from rlhfkit.data.template_jinja import builtin_chat_template
from rlhfkit.errors import fail
from rlhfkit.hub import push_folder, resolve_model_args
from rlhfkit.models.adapters import check_adapter_dir, merge_adapters, split_paths
from rlhfkit.models.loading import load_causal_lm, resolve_dtype
from rlhfkit.models.value_head import VALUE_HEAD_FILE, ValueHead, has_value_head, value_head_folder
from rlhfkit.run_lock import OutputLock, holds_files
from rlhfkit.training.runtime import check_one_process, check_output_folder

logger = logging.getLogger(__name__)

GB = 10**9


def check_export_config(config: Config) -> None:
    """Validate the keys export reads; messages name the key and what to do."""
    src, m, e = config.source, config.model, config.export
    if not m.model_name_or_path:
        raise fail(f"{src}: model_name_or_path is required; set it to the base model folder")
    if not e.export_dir:
        raise fail(f"{src}: export_dir is required; set it to the folder for the exported model")
    if e.export_size <= 0:
        raise fail(f"{src}: export_size must be > 0 (GB per weight file), got {e.export_size}")
    if e.export_device not in ("cpu", "auto"):
        raise fail(f"{src}: export_device is '{e.export_device}'; allowed: cpu, auto")
    if e.export_legacy_format:
        raise fail(f"{src}: export_legacy_format: true (PyTorch .bin files) is not supported; transformers 5 "
                   "writes safetensors, which every current loader reads; set export_legacy_format: false")
    for key in ("torch_dtype", "infer_dtype"):
        if getattr(m, key) not in ("auto", "float32", "bfloat16", "float16"):
            raise fail(f"{src}: {key} is '{getattr(m, key)}'; allowed: auto, float32, bfloat16, float16")
    if config.training.bf16 and config.training.fp16:
        raise fail(f"{src}: bf16 and fp16 are both true; choose one")
    if m.quantization_bit is not None:
        raise fail(f"{src}: export merges adapters into full-precision weights; remove quantization_bit "
                   "(the base is loaded unquantized for the merge)")
    export_dir = Path(e.export_dir).resolve()
    sources = [m.model_name_or_path, *split_paths(m.adapter_name_or_path)]
    if any(Path(s).resolve() == export_dir for s in sources):
        raise fail(f"{src}: export_dir {e.export_dir} is one of the folders being read; choose another folder")
    if export_dir.exists() and not export_dir.is_dir():
        raise fail(f"{src}: export_dir {e.export_dir} is a file; choose a folder path")


def _check_export_dir_empty(config: Config, export_dir: Path) -> None:
    """Refuse a non-empty export_dir (its lock file aside) unless overwriting; checked under its lock."""
    if export_dir.is_dir() and holds_files(export_dir) and not config.output.overwrite_output_dir:
        raise fail(f"{config.source}: export_dir {export_dir} is not empty; set overwrite_output_dir: true or "
                   "choose another folder")


def export_dtype(config: Config):
    """The saved dtype: `torch_dtype`, else LLaMA-Factory's `infer_dtype`, else bf16 / fp16 when set, else
    "auto" (the checkpoint's own)."""
    m, t = config.model, config.training
    if m.torch_dtype == "auto" and m.infer_dtype != "auto":
        return resolve_dtype(dataclasses.replace(m, torch_dtype=m.infer_dtype))
    if m.torch_dtype == "auto" and not (t.bf16 or t.fp16):
        return "auto"
    return resolve_dtype(m, t)


def _check_only_base_tensors(model, expected: set[str], adapters: list[str]) -> None:
    extra = sorted(set(model.state_dict()) - expected)
    if extra:
        raise fail(f"refusing to export: merging {', '.join(adapters)} left tensors that are not part of the base "
                   f"language model ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); a value head or "
                   "unmerged adapter weights must not be saved into the LM")


def _describe(model, tokenizer, config: Config) -> None:
    """Chat template into the tokenizer; stop tokens and PAD into the generation config."""
    name = (config.data.template or "auto").strip().lower()
    if name != "auto":
        template = template_for(config.data, tokenizer)
        tokenizer.chat_template = builtin_chat_template(template, tokenizer)
        logger.info("chat template '%s' written into the tokenizer", name)
    elif not getattr(tokenizer, "chat_template", None):
        logger.warning("the tokenizer has no chat template; set template: to a built-in name (docs/data.md) "
                       "to write one")
        return
    stops = template_for(config.data, tokenizer).stop_token_ids(tokenizer)
    generation = model.generation_config
    generation.eos_token_id = stops[0] if len(stops) == 1 else stops
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id


def _value_head_folder(config: Config, adapters: list[str]) -> Path:
    folder = value_head_folder(config.model.model_name_or_path, adapters)
    if not has_value_head(folder):
        raise fail(f"{config.source}: stage: rm exports a reward model, but {folder / VALUE_HEAD_FILE} does not "
                   "exist; point adapter_name_or_path (or model_name_or_path) at an rm-stage output")
    ValueHead.load(folder)  # a pickled head stops here, before anything is written
    return folder


def _weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def run_export(config: Config) -> Path:
    """Merge, check and save as described in the module docstring; return export_dir."""
    # 1. check
    check_export_config(config)
    check_one_process("export")
    export_dir = check_output_folder(config.export.export_dir, "export_dir")
    with OutputLock(export_dir, "export_dir"):  # no other run writes there between the check and the save
        _check_export_dir_empty(config, export_dir)
        return _export(config, export_dir)


def _export(config: Config, export_dir: Path) -> Path:
    """Steps 2-6, under export_dir's lock."""
    m, e = config.model, config.export
    resolve_model_args(m)  # hub ids -> local snapshot folders
    adapters = split_paths(m.adapter_name_or_path)
    for path in adapters:
        check_adapter_dir(path)
    value_head_from = _value_head_folder(config, adapters) if config.finetuning.stage == "rm" else None
    # 2. load
    source = tokenizer_folder(m.model_name_or_path, adapters)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as err:
        raise fail(f"cannot load a tokenizer from {source}: {str(err).splitlines()[0]}") from None
    device = inference_device(e.export_device)
    model = load_causal_lm(m.model_name_or_path, m, export_dtype(config), device)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    expected = set(model.state_dict())
    # 3. merge
    model = merge_adapters(model, adapters)
    _check_only_base_tensors(model, expected, adapters)
    # 4. describe
    _describe(model, tokenizer, config)
    # 5. save
    export_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(export_dir, max_shard_size=max(int(e.export_size * GB), 1))
    tokenizer.save_pretrained(export_dir)
    if value_head_from is not None:  # rewritten in LLaMA-Factory's key names, whatever layout it came in
        ValueHead.load(value_head_from, model.config.get_text_config().hidden_size).save(export_dir)
        logger.info("value head written beside the model (%s), not into its weights", VALUE_HEAD_FILE)
    elif adapters and has_value_head(adapters[-1]):
        logger.info("%s in %s is not exported (it is not part of the language model; use stage: rm to export a "
                    "reward model with its head beside it)", VALUE_HEAD_FILE, adapters[-1])
    files = [f for f in _weight_files(export_dir) if f.name != VALUE_HEAD_FILE]
    size = sum(f.stat().st_size for f in files)
    logger.info("exported %s%s to %s: %d weight file(s), %.1f MB; load it with "
                "AutoModelForCausalLM.from_pretrained(%r)", m.model_name_or_path,
                f" + {', '.join(adapters)}" if adapters else "", export_dir, len(files), size / 1e6, str(export_dir))
    # 6. upload
    if e.export_hub_model_id:
        push_folder(export_dir, e.export_hub_model_id, m.hf_hub_token, "export_hub_model_id")
    return export_dir

