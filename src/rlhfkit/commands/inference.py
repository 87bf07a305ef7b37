"""Loading a model for inference: base weights with LoRA adapters merged in, its tokenizer, a device."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rlhfkit.config import ModelArguments
from rlhfkit.errors import fail
from rlhfkit.hub import resolve, resolve_model_args
from rlhfkit.models.adapters import apply_frozen_adapters, check_adapter_dir
from rlhfkit.models.loading import load_causal_lm, load_tokenizer

logger = logging.getLogger(__name__)


def inference_device(choice: str = "auto") -> torch.device:
    """`cpu`, or for `auto` the first of cuda, mps, cpu that is available."""
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
    return torch.device("cpu")


def tokenizer_folder(model_path: str, adapters: list[str]) -> str:
    """Where the tokenizer comes from: the last adapter folder if it holds one, else the model folder.

    The stages save the tokenizer they trained with beside each adapter.
    """
    if adapters and (Path(adapters[-1]) / "tokenizer_config.json").is_file():
        return adapters[-1]
    return model_path


INFER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_dtype(model_args: ModelArguments, device: torch.device) -> torch.dtype | str:
    """The weights' dtype from `infer_dtype`: auto is float32 on the CPU, the checkpoint's own ("auto")
    on an accelerator."""
    if model_args.infer_dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    if model_args.infer_dtype not in INFER_DTYPES:
        raise fail(f"infer_dtype is '{model_args.infer_dtype}'; allowed: auto, {', '.join(INFER_DTYPES)}")
    return INFER_DTYPES[model_args.infer_dtype]


def load_for_inference(model_args: ModelArguments, adapters: list[str], device: torch.device,
                       dtype: torch.dtype | None = None):
    """(model, tokenizer): the base of `model_args` with `adapters` merged in order, in eval mode.

    Hub ids are fetched (see `rlhfkit.hub`). `dtype` None means `inference_dtype`. With
    `quantization_bit` the base loads quantized and its one adapter stays unmerged. The tokenizer has
    a PAD token distinct from EOS and pads on the left.
    """
    resolve_model_args(model_args)
    adapters = [resolve(path, "adapter_name_or_path", model_args) for path in adapters]
    for path in adapters:
        check_adapter_dir(path)
    tokenizer = load_tokenizer(model_args, tokenizer_folder(model_args.model_name_or_path, adapters))
    if dtype is None:
        dtype = inference_dtype(model_args, device)
    if model_args.quantization_bit is not None and dtype == "auto":  # bitsandbytes computes in a named dtype
        dtype = torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
    model = load_causal_lm(model_args.model_name_or_path, model_args, dtype, device, tokenizer,
                           quantization_bit=model_args.quantization_bit)
    model = apply_frozen_adapters(model, adapters)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer
