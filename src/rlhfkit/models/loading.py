"""Load tokenizers and causal LMs (dtype, device, attention kernel, RoPE scaling, quantization,
vocabulary size, freezing) in one place for every stage."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from rlhfkit.config import FinetuningArguments, ModelArguments, TrainingArguments
from rlhfkit.errors import fail, one_line
from rlhfkit.hub import hub_id_of
from rlhfkit.models.quantization import bnb_config
from rlhfkit.models.rope import apply_rope_scaling
from rlhfkit.models.weight_files import model_weight_files, read_json

logger = logging.getLogger(__name__)

POLICY_ADAPTER = "default"


def resolve_dtype(model_args: ModelArguments, training_args: TrainingArguments | None = None) -> torch.dtype:
    """Weight dtype from `torch_dtype`, or from the bf16/fp16 flags when it is auto."""
    named = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if model_args.torch_dtype != "auto":
        return named[model_args.torch_dtype]
    if training_args is not None and training_args.bf16:
        return torch.bfloat16
    if training_args is not None and training_args.fp16:
        return torch.float16
    return torch.float32


def check_model_path(path: str, require_config: bool = True) -> None:
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists() or path.count("/") != 1
    if looks_local and not local.is_dir():
        raise fail(f"model path {path} does not exist; set model_name_or_path to a model folder")
    if require_config and local.is_dir() and not (local / "config.json").is_file():
        raise fail(f"{path} has no config.json; it is not a Hugging Face model folder")
    if local.is_dir() and (local / "config.json").is_file():
        read_json(local / "config.json")


def load_tokenizer(model_args: ModelArguments, path: str | None = None):
    """Load the tokenizer and make PAD a real token different from EOS.

    If the tokenizer has no PAD (or PAD equals EOS), an existing special token that is not EOS
    (unk, then bos) becomes PAD; failing that a `<|pad|>` token is added (the model's embeddings
    are resized by `load_causal_lm`). Every forward pass uses explicit attention masks, so the
    choice of PAD never changes a result.
    """
    path = path or model_args.model_name_or_path
    # A tokenizer folder needs no config.json: an RM adapter folder holds only adapter and tokenizer files.
    check_model_path(path, require_config=not (Path(path).expanduser() / "tokenizer_config.json").is_file())
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    except Exception as err:  # a damaged tokenizer file fails in many ways (tokenizers raises plain Exception)
        raise fail(f"cannot load a tokenizer from {path}: {one_line(err)}") from err
    if tokenizer.eos_token_id is None:
        raise fail(f"the tokenizer in {path} has no EOS token; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        for candidate in (tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None and tokenizer.convert_tokens_to_ids(candidate) != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        logger.info("PAD set to %r (id %d), distinct from EOS", tokenizer.pad_token, tokenizer.pad_token_id)
    tokenizer.padding_side = "left"
    return tokenizer


FLASH_ATTN_KERNELS = {"disabled": "eager", "fa2": "flash_attention_2", "sdpa": "sdpa", "auto": None}


def attn_implementation(model_args: ModelArguments) -> str | None:
    """The attention kernel for transformers (None: its default); flash-attn kernels are checked to be usable."""
    if model_args.flash_attn is not None and model_args.attn_implementation == "auto":
        kernel, key = FLASH_ATTN_KERNELS.get(model_args.flash_attn, model_args.flash_attn), "flash_attn"
    else:
        kernel, key = model_args.attn_implementation, "attn_implementation"
        kernel = None if kernel == "auto" else kernel
    if kernel in ("flash_attention_2", "flash_attention_3"):
        import transformers.utils

        version = kernel[-1]
        available = getattr(transformers.utils, f"is_flash_attn_{version}_available", lambda: False)
        if not available():
            package = "flash-attn" if version == "2" else "flash-attn 3 (flash_attn_interface)"
            raise fail(f"{key}: {getattr(model_args, key)} needs the {package} package and a CUDA GPU "
                       f"(pip install flash-attn --no-build-isolation); or use sdpa ({key}: sdpa)")
    return kernel


def load_causal_lm(
    path: str,
    model_args: ModelArguments,
    dtype: torch.dtype,
    device: torch.device | None,
    tokenizer=None,
    quantization_bit: int | None = None,
    max_length: int | None = None,
    quantization_key: str = "quantization_bit",
) -> PreTrainedModel:
    """Load a causal LM from `path` in `dtype` onto `device` (None leaves it on the CPU for accelerate).

    `quantization_bit` (4 or 8, named `quantization_key` in messages) loads the linear layers with
    bitsandbytes, straight onto `device`. `max_length`: the training sequence length for
    `rope_scaling` (None outside training). The embeddings grow to the tokenizer's length when it
    is longer (`resize_vocab`: rounded up to a multiple of 64).
    """
    check_model_path(path)
    if Path(path).expanduser().is_dir():  # a folder's weights are checked before transformers reads them
        model_weight_files(Path(path).expanduser())
    kwargs = {"dtype": dtype, "trust_remote_code": model_args.trust_remote_code, "use_safetensors": True}
    attn = attn_implementation(model_args)
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if quantization_bit is not None:
        kwargs["quantization_config"] = bnb_config(quantization_bit, model_args, dtype, quantization_key)
        kwargs["device_map"] = {"": device if device is not None else "cpu"}
    try:
        if model_args.rope_scaling is not None:
            kwargs["config"] = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
            apply_rope_scaling(kwargs["config"], model_args.rope_scaling, max_length)
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError, StrictDataclassError) as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        if "ignore_mismatched_sizes" in str(err):
            raise fail(f"the weights in {path} do not fit its config.json: tensors of another shape; "
                       "copy or save the model again") from err
        raise fail(f"cannot load a causal LM from {path}: {one_line(err)}") from err
    missing = sorted(set(info["missing_keys"]) | {key[0] for key in info["mismatched_keys"]})
    if missing:  # transformers would start them from random values
        raise fail(f"the weights in {path} do not fit its config.json: {len(missing)} tensors missing or of "
                   f"another shape ({', '.join(missing[:3])}, ...); copy or save the model again")
    if hub_id_of(path):  # saved adapters name the hub id as their base, not the cache folder
        model.name_or_path = model.config.name_or_path = hub_id_of(path)
    if tokenizer is not None:
        resize_embeddings(model, len(tokenizer), model_args.resize_vocab)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None and quantization_bit is None:
        model.to(device)
    return model


def resize_embeddings(model: PreTrainedModel, vocab: int, resize_vocab: bool) -> None:
    """Grow the embeddings to `vocab` rows when they are fewer; with `resize_vocab` rounded up to a
    multiple of 64 (as LLaMA-Factory does). New rows are drawn around the mean of the old ones."""
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab <= rows:
        return
    model.resize_token_embeddings(vocab, pad_to_multiple_of=64 if resize_vocab else None)
    logger.info("embeddings resized from %d to %d rows", rows, model.get_input_embeddings().weight.shape[0])


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability in `model` to zero (PPO needs deterministic forward passes)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Turn on activation recomputation; inputs need grads so LoRA-only training still flows."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def upcast_trainable_parameters(model: nn.Module) -> None:
    """Keep trainable parameters in float32 (mixed precision keeps master weights there)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def apply_freeze(model: PreTrainedModel, finetuning: FinetuningArguments) -> None:
    """`finetuning_type: freeze`: train only the last (or first) N decoder layers."""
    layers = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers"):
            layers = (name, len(module))
            break
    if layers is None:
        raise fail("finetuning_type: freeze could not find the decoder layers of this model; use lora or full")
    prefix, count = layers
    n = finetuning.freeze_trainable_layers
    chosen = range(count - n, count) if n > 0 else range(0, -n)
    trainable_prefixes = [f"{prefix}.{i}." for i in chosen]
    modules = [m.strip() for m in finetuning.freeze_trainable_modules.split(",") if m.strip()]
    for name, param in model.named_parameters():
        in_layer = any(name.startswith(p) or f".{p}" in name for p in trainable_prefixes)
        in_module = modules == ["all"] or any(f".{m}." in name for m in modules)
        param.requires_grad_(in_layer and in_module)
