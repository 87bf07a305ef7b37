"""LoRA through peft: load existing adapters, add a trainable one, or freeze layers."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from transformers import PreTrainedModel

from rlhfkit.config import FinetuningArguments
from rlhfkit.errors import fail, one_line
from rlhfkit.models.loading import POLICY_ADAPTER, apply_freeze, upcast_trainable_parameters
from rlhfkit.models.quantization import is_quantized, prepare_for_kbit_training
from rlhfkit.models.weight_files import check_adapter_weights, read_json

logger = logging.getLogger(__name__)


def split_paths(value: str | None) -> list[str]:
    """Comma-separated paths as a list."""
    return [p.strip() for p in (value or "").split(",") if p.strip()]


def check_adapter_dir(path: str) -> None:
    """Fail clearly unless `path` holds a peft adapter (its weights are checked when loaded)."""
    if not Path(path).is_dir():
        raise fail(f"adapter folder {path} does not exist; check adapter_name_or_path")
    if not (Path(path) / "adapter_config.json").is_file():
        raise fail(f"{path} has no adapter_config.json; it is not a LoRA adapter folder")
    read_json(Path(path) / "adapter_config.json")


def adapter_base_path(path: str) -> str | None:
    """The base model an adapter folder was trained on, as recorded by peft."""
    return read_json(Path(path) / "adapter_config.json").get("base_model_name_or_path")


@contextlib.contextmanager
def loading_adapter(path: str) -> Iterator[None]:
    """Check the adapter folder `path` and its weights; inside, a failure of peft's loading becomes one
    line naming the folder."""
    check_adapter_dir(path)
    check_adapter_weights(path)
    try:
        yield
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        raise fail(f"cannot load the LoRA adapter {path}: {one_line(err)}; was it trained on this base "
                   "model?") from err


def load_frozen_adapter(peft_model, path: str, name: str) -> None:
    """Load the adapter folder `path` into `peft_model` as the frozen adapter `name`."""
    with loading_adapter(path):
        peft_model.load_adapter(path, adapter_name=name, is_trainable=False)


def embedding_module_names(model: PreTrainedModel) -> list[str]:
    """The names (last component) of the input and output embedding modules, e.g. embed_tokens, lm_head."""
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
    return sorted({name.split(".")[-1] for name, module in model.named_modules()
                   if any(module is e for e in embeddings if e is not None)})


def check_module_names(model: PreTrainedModel, key: str, names: list[str]) -> None:
    """Each of `names` (`lora_target` or `additional_target`) must name a module of `model`, as peft
    matches them: the module's full name or its last components. None found stops the run in one line
    listing the linear layers; some missing is a warning (peft, and so LLaMA-Factory, skips them)."""
    modules = [name for name, _ in model.named_modules() if name]
    missing = [n for n in names if not any(m == n or m.endswith("." + n) for m in modules)]
    if not missing:
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    spaced = " (separate names with commas)" if any(" " in n.strip() for n in missing) else ""
    shown = ", ".join(repr(n) for n in missing)
    if len(missing) == len(names):
        raise fail(f"{key}: no module named {shown} in the model{spaced}; its linear layers are {', '.join(linear)}"
                   + ("; or use lora_target: all" if key == "lora_target" else ""))
    logger.warning("note: %s: no module named %s in the model%s; skipped, as peft skips it", key, shown, spaced)


def lora_config(finetuning: FinetuningArguments, train_embeddings: list[str] | None = None,
                tied_embeddings: bool = False) -> LoraConfig:
    """The LoraConfig for a new trainable adapter.

    `train_embeddings`: module names trained fully when additional_target is unset (the embedding
    layers after `resize_vocab`, as LLaMA-Factory does); with `tied_embeddings` their trained copies
    stay tied.
    """
    targets = [t.strip() for t in finetuning.lora_target.split(",") if t.strip()]
    target_modules = "all-linear" if targets == ["all"] else targets
    extra = split_paths(finetuning.additional_target) or train_embeddings or None
    init = True
    if finetuning.pissa_init:
        init = "pissa" if finetuning.pissa_iter == -1 else f"pissa_niter_{finetuning.pissa_iter}"
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=finetuning.lora_rank,
        lora_alpha=finetuning.lora_alpha or 2 * finetuning.lora_rank,
        lora_dropout=finetuning.lora_dropout,
        target_modules=target_modules,
        modules_to_save=extra,
        use_dora=finetuning.use_dora,
        use_rslora=finetuning.use_rslora,
        init_lora_weights=init,
        ensure_weight_tying=tied_embeddings and bool(train_embeddings) and not finetuning.additional_target,
    )


def merge_adapters(model: PreTrainedModel, paths: list[str]) -> PreTrainedModel:
    """Merge each adapter in `paths` into the base weights, in order."""
    for path in paths:
        with loading_adapter(path):
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        logger.info("merged adapter %s into the base weights", path)
    return model


def apply_frozen_adapters(model: PreTrainedModel, paths: list[str], key: str = "adapter_name_or_path"):
    """`model` with the adapters in `paths` for inference: merged into the weights, or on a quantized
    model (where merging would round the adapter's update away) one adapter kept unmerged."""
    if not paths or not is_quantized(model):
        return merge_adapters(model, paths)
    if len(paths) > 1:
        raise fail(f"{key}: a quantized model takes a single adapter (merging into quantized weights loses the "
                   "update); merge the adapters first with `rlhfkit export`")
    check_adapter_dir(paths[0])
    return PeftModel.from_pretrained(model, paths[0], is_trainable=False)
def merged_adapter_paths(finetuning: FinetuningArguments, adapter_paths: list[str]) -> list[str]:
    """The adapters `setup_finetuning` merges into the base: all but the last, which LoRA resumes, unless
    `create_new_adapter` or another finetuning_type merges that too."""
    if finetuning.finetuning_type == "lora" and adapter_paths and not finetuning.create_new_adapter:
        return adapter_paths[:-1]
    return list(adapter_paths)


def setup_finetuning(
    model: PreTrainedModel,
    finetuning: FinetuningArguments,
    adapter_paths: list[str],
    trainable: bool = True,
    resize_vocab: bool = False,
):
    """Prepare `model` for training according to `finetuning_type`.

    lora: the adapters in `adapter_paths` before the last are merged into the base; the last one is
    resumed for training, unless `create_new_adapter`, which merges it too and starts a fresh
    adapter. With no adapters a fresh one is created. Returns a PeftModel whose trainable adapter is
    named `default`. A quantized base is first prepared with peft's `prepare_model_for_kbit_training`.
    With `resize_vocab` a fresh adapter also trains the embedding layers (unless additional_target
    names other modules). full: every weight trains. freeze: only the chosen layers train.
    """
    if finetuning.finetuning_type != "lora":
        if adapter_paths:
            model = merge_adapters(model, adapter_paths)
        if finetuning.finetuning_type == "full":
            model.requires_grad_(trainable)
        else:
            apply_freeze(model, finetuning)
        upcast_trainable_parameters(model)
        return model
    if trainable and is_quantized(model):
        model = prepare_for_kbit_training(model)
    to_merge = merged_adapter_paths(finetuning, adapter_paths)
    resume = adapter_paths[-1] if len(to_merge) < len(adapter_paths) else None
    model = merge_adapters(model, to_merge)
    if resume is not None:
        with loading_adapter(resume):
            model = PeftModel.from_pretrained(model, resume, adapter_name=POLICY_ADAPTER, is_trainable=trainable)
        logger.info("resumed adapter %s for training", resume)
    else:
        embeddings = embedding_module_names(model) if resize_vocab else None
        tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        targets = [t.strip() for t in finetuning.lora_target.split(",") if t.strip()]
        if targets != ["all"]:
            check_module_names(model, "lora_target", targets)
        check_module_names(model, "additional_target", split_paths(finetuning.additional_target))
        model = get_peft_model(model, lora_config(finetuning, embeddings, tied), adapter_name=POLICY_ADAPTER)
    if not trainable:
        model.requires_grad_(False)
    upcast_trainable_parameters(model)
    return model


PISSA_INIT = "pissa_init"
PISSA_CONVERTED = "pissa_converted"


def _save_as_plain_lora(model, directory: Path, **kwargs) -> None:
    """Save the `default` adapter with init_lora_weights True in its config (peft's rule for PiSSA conversion)."""
    config = model.peft_config[POLICY_ADAPTER]
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(directory, selected_adapters=[POLICY_ADAPTER], safe_serialization=True, **kwargs)
    finally:
        config.init_lora_weights = init


def save_pissa_init(model, output_dir: str | Path) -> None:
    """Before training: the PiSSA adapter as initialised, in output_dir/pissa_init (kept when resuming)."""
    from accelerate import PartialState

    directory = Path(output_dir) / PISSA_INIT
    if PartialState().is_main_process and not (directory / "adapter_config.json").is_file():
        _save_as_plain_lora(model, directory)


def save_pissa_converted(model, output_dir: str | Path) -> Path:
    """After training: the PiSSA adapter as a plain LoRA adapter of the original base (rank 2 x lora_rank),
    in output_dir/pissa_converted."""
    directory = Path(output_dir) / PISSA_CONVERTED
    _save_as_plain_lora(model, directory,
                        path_initial_model_for_weight_conversion=str(Path(output_dir) / PISSA_INIT))
    logger.info("PiSSA adapter converted to a LoRA adapter of the original base: %s", directory)
    return directory
