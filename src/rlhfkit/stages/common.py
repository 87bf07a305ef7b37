"""Set-up shared by the stages: data for a stage, the trainable model, the end-of-run save."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit.checkpoint import check_finite
from rlhfkit.checkpoint_files import write_problem
from rlhfkit.config import Config
from rlhfkit.data import (
    load_examples,
    resolve_datasets,
    template_for,
    tokenize_pairwise,
    tokenize_prompts,
    tokenize_sft,
    train_val_split,
)
from rlhfkit.errors import fail
from rlhfkit.models.adapters import save_pissa_converted, save_pissa_init, setup_finetuning, split_paths
from rlhfkit.models.compile import compile_blocks
from rlhfkit.models.loading import (
    count_parameters,
    enable_gradient_checkpointing,
    load_causal_lm,
    resolve_dtype,
)
from rlhfkit.models.saving import save_pretrained_model, split_trained
from rlhfkit.training.distributed import global_sums, is_sharded
from rlhfkit.training.probe import check_outputs_finite, probe_ids

logger = logging.getLogger(__name__)

KIND_BY_STAGE = {"sft": "sft", "rm": "pairwise", "ppo": "prompt"}


@dataclass
class StageData:
    """Tokenized train and evaluation items of one stage."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    template: Any


def _tokenize(config: Config, examples, tokenizer, template) -> tuple[list[dict], Any]:
    d = config.data
    stage = config.finetuning.stage
    if stage == "sft":
        return tokenize_sft(examples, tokenizer, template, d.cutoff_len, d.train_on_prompt, d.mask_history)
    if stage == "rm":
        return tokenize_pairwise(examples, tokenizer, template, d.cutoff_len)
    return tokenize_prompts(examples, tokenizer, template, d.cutoff_len, d.overlong_prompts)


def load_stage_data(config: Config, tokenizer) -> StageData:
    """Read, template and tokenize the datasets of `config` for its stage; split off validation."""
    d = config.data
    kind = KIND_BY_STAGE[config.finetuning.stage]
    template = template_for(d, tokenizer)
    hub = {"cache_dir": config.model.cache_dir, "token": config.model.hf_hub_token}
    examples = load_examples(resolve_datasets(d.dataset, d.dataset_dir, **hub), kind, d.max_samples)
    train, stats = _tokenize(config, examples, tokenizer, template)
    logger.info("dataset %s: %s", d.dataset, stats.summary())
    if not train:
        raise fail(f"dataset {d.dataset}: no usable rows after tokenization with cutoff_len={d.cutoff_len}; "
                   "raise cutoff_len or check the data")
    evaluation: list[dict] = []
    if d.eval_dataset:
        eval_examples = load_examples(resolve_datasets(d.eval_dataset, d.dataset_dir, **hub), kind, d.max_samples)
        evaluation, eval_stats = _tokenize(config, eval_examples, tokenizer, template)
        logger.info("eval dataset %s: %s", d.eval_dataset, eval_stats.summary())
    elif d.val_size > 0:
        val_size = int(d.val_size) if d.val_size >= 1 else d.val_size
        train, evaluation = train_val_split(train, val_size, config.training.seed)
        if not train:
            raise fail(f"val_size={d.val_size} leaves no training rows; lower it")
    return StageData(train=train, eval=evaluation, template=template)


def load_trainable_model(config: Config, tokenizer, device: torch.device | None):
    """The base model with the stage's finetuning applied (LoRA adapter, full or freeze)."""
    m = config.model
    dtype = resolve_dtype(m, config.training)
    model = load_causal_lm(m.model_name_or_path, m, dtype, device, tokenizer, quantization_bit=m.quantization_bit,
                           max_length=config.data.cutoff_len)
    if config.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = setup_finetuning(model, config.finetuning, split_paths(m.adapter_name_or_path),
                             resize_vocab=m.resize_vocab)
    if config.finetuning.pissa_init and config.finetuning.pissa_convert:
        save_pissa_init(model, config.output.output_dir)
    if config.training.torch_compile:
        compile_blocks(model, config.training.torch_compile_memory_budget)
    trainable, total = count_parameters(model)
    logger.info("model %s: %s, %.2fM trainable of %.2fM parameters", config.model.model_name_or_path,
                config.finetuning.finetuning_type, trainable / 1e6, total / 1e6)
    if trainable == 0:
        raise fail("no trainable parameters; check finetuning_type, lora_target and freeze_trainable_layers")
    return model


def trainable_named_parameters(*modules) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs of every trainable parameter of `modules`, in order."""
    named = []
    for index, module in enumerate(modules):
        named += [(f"{index}.{n}", p) for n, p in module.named_parameters() if p.requires_grad]
    return named


def save_trained(accelerator, prepared, modules: dict[str, torch.nn.Module], tokenizer, output_dir,
                 config: Config | None = None) -> None:
    """The end-of-run save: check the weights and their outputs on a probe text, gather them if
    sharded, write on the main process; with `config`, also its PiSSA conversion (pissa_convert)
    and the Hub upload (push_to_hub).

    Every process calls this (the checks and the gathering are collective). `prepared` is the
    module accelerate prepared (a causal LM or a ModelWithValueHead); `modules` its trainable parts.
    """
    check_finite(modules, accelerator)
    check_outputs_finite(accelerator, prepared, probe_ids(tokenizer, accelerator.device),
                         f"the trained model to {output_dir}", output_dir)
    full_state = accelerator.get_state_dict(prepared) if is_sharded(accelerator) else None
    problem = None
    if accelerator.is_main_process:
        model, model_state, value_head = split_trained(accelerator.unwrap_model(prepared), full_state)
        try:
            save_pretrained_model(model, tokenizer, output_dir, value_head, state_dict=model_state)
            if config is not None and config.finetuning.pissa_init and config.finetuning.pissa_convert:
                save_pissa_converted(model, output_dir)
        except Exception as err:
            problem = write_problem(err, Path(output_dir))
            if problem is None:  # not a file-system fault: a bug, shown as it is
                raise
        else:
            logger.info("saved to %s", output_dir)
    failed = problem is not None
    if accelerator.num_processes > 1:  # every process stops together
        failed = global_sums(accelerator, failed)[0] > 0
    if failed:
        raise fail(f"could not write the trained model to {output_dir}: {problem or 'the main process failed'}; "
                   "free space there and run again (its checkpoints, if any, can be resumed)")
    accelerator.wait_for_everyone()
    if config is not None and config.output.push_to_hub and accelerator.is_main_process:
        push_output(config, output_dir)


def push_output(config: Config, output_dir) -> str:
    """Upload output_dir's final weights (not its checkpoints) to hub_model_id (default: the folder's name)."""
    from pathlib import Path

    from rlhfkit.hub import push_folder

    repo_id = config.output.hub_model_id or Path(output_dir).resolve().name
    return push_folder(output_dir, repo_id, config.model.hf_hub_token, "hub_model_id",
                       private=config.output.hub_private_repo, ignore_patterns=["checkpoint-*", "checkpoint-*/**"])
