"""On-the-fly quantization with bitsandbytes (QLoRA): the load arguments and the training preparation.

`quantization_bit: 4` loads every linear layer of the base as bitsandbytes `Linear4bit`
(`quantization_type` nf4 or fp4, `double_quantization`), `8` as `Linear8bitLt`; the LoRA adapter
on top trains in float32. bitsandbytes runs on CUDA and, since its CPU backend, on the CPU.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from rlhfkit.config import ModelArguments
from rlhfkit.errors import fail

logger = logging.getLogger(__name__)


def require_bitsandbytes(key: str = "quantization_bit") -> None:
    """Fail in one line unless bitsandbytes can be imported."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise fail(f"{key} needs the bitsandbytes package: pip install bitsandbytes "
                   "(or pip install 'rlhfkit[quantization]'), or remove the key")


def bnb_config(bits: int, model_args: ModelArguments, dtype: torch.dtype, key: str = "quantization_bit"):
    """transformers' BitsAndBytesConfig for `bits` (4 or 8); 4-bit computes and stores in `dtype`."""
    require_bitsandbytes(key)
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits != 4:
        raise fail(f"{key} must be 4 or 8 with bitsandbytes, got {bits}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.quantization_type,
        bnb_4bit_use_double_quant=model_args.double_quantization,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # FSDP shards 4-bit weights stored in the compute dtype
    )


def is_quantized(model) -> bool:
    """Whether `model` (or the model inside a PeftModel) was loaded with bitsandbytes."""
    base = getattr(model, "get_base_model", lambda: model)()
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def prepare_for_kbit_training(model):
    """peft's preparation of a quantized base: freeze it and keep its non-quantized tensors in float32.

    Gradient checkpointing is switched on separately (`enable_gradient_checkpointing`), the same
    way as for unquantized models.
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
