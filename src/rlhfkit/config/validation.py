"""Range and combination checks, each with a message that names the key and what is allowed."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from rlhfkit.data.templates import check_template_name
from rlhfkit.errors import fail, shown

if TYPE_CHECKING:
    from rlhfkit.config.loader import Config

STAGES = ("sft", "rm", "ppo")
# LLaMA-Factory's other stages, with what to do instead.
OTHER_STAGES = {
    "pt": "pre-training on raw text is not implemented",
    "dpo": "to learn from preference pairs, train a reward model with stage rm, then run stage ppo",
    "kto": "to learn from preference labels, train a reward model with stage rm, then run stage ppo",
}
FINETUNING_TYPES = ("lora", "full", "freeze")
REWARD_MODEL_TYPES = ("lora", "full", "api", "function")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
    "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor", "sgd")
REPORT_TO = ("none", "all", "tensorboard", "wandb", "mlflow", "swanlab")
NUM_INPUT_TOKENS_SEEN = {False: "no", "no": "no", True: "non_padding", "non_padding": "non_padding", "all": "all"}
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline")
ROLLOUT_ENGINES = ("auto", "recording", "static")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
FLASH_ATTN = ("auto", "disabled", "sdpa", "fa2")
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3")
LORA_ONLY_KEYS = ("use_dora", "use_rslora", "loraplus_lr_ratio", "pissa_init")


def _choice(source: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise fail(f"{source}: {key} is {shown(value)}; allowed: {', '.join(allowed)}")


def _positive(source: str, key: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:  # a device-dependent default, filled in once the device is known
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise fail(f"{source}: {key} must be {bound}, got {value}")


def report_to_list(value) -> list[str]:
    """`report_to` as a list of tracker names ('none' and null removed; 'all' kept, see `tracking.trackers`)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(v).strip() for v in items if v is not None and str(v).strip() and str(v).strip() != "none"]


def check_stage(source: str, stage) -> None:
    """Refuse a stage we do not have, naming the ones we have (checked before any other key)."""
    if stage in STAGES:
        return
    why = OTHER_STAGES.get(stage, "it is not one of LLaMA-Factory's stages either")
    raise fail(f"{source}: stage '{stage}' is not supported (we have {', '.join(STAGES)}; {why})")


def check_default_only(source: str, key: str, value, default, why: str) -> None:
    """A LLaMA-Factory key we accept only at the value that changes nothing (`DEFAULT_ONLY_KEYS`)."""
    if value is None or value == default or str(value).lower() == str(default).lower():
        return
    fix = "remove the key" if default is None else f"remove the key or set it to {str(default).lower()}"
    raise fail(f"{source}: {key}: {value!r} is not supported ({why}); {fix}")


def resolve_gradient_checkpointing(training) -> None:
    """gradient_checkpointing unset: on unless disable_gradient_checkpointing (LLaMA-Factory's default)."""
    if training.gradient_checkpointing is None:
        training.gradient_checkpointing = not training.disable_gradient_checkpointing


def check_infer_backend(source: str, value: str) -> None:
    """Only transformers' generate is available; vllm, sglang and ktransformers are LLaMA-Factory's."""
    if value != "huggingface":
        raise fail(f"{source}: infer_backend: {value} is not supported; rlhfkit generates with transformers, so set "
                   "infer_backend: huggingface (or remove the key)")


def validate(config: "Config") -> None:
    """Check ranges and combinations; raise RlhfkitError naming the key(s) at fault."""
    src = config.source
    m, d, f, t, p, o = config.model, config.data, config.finetuning, config.training, config.ppo, config.output
    check_stage(src, f.stage)
    _choice(src, "finetuning_type", f.finetuning_type, FINETUNING_TYPES)
    _choice(src, "torch_dtype", m.torch_dtype, DTYPES)
    _choice(src, "infer_dtype", m.infer_dtype, DTYPES)
    _choice(src, "device", m.device, ("auto", "cpu"))
    check_infer_backend(src, m.infer_backend)
    _choice(src, "lr_scheduler_type", t.lr_scheduler_type, SCHEDULERS)
    _choice(src, "overlong_prompts", d.overlong_prompts, ("drop", "error"))
    _choice(src, "reward_model_type", p.reward_model_type, REWARD_MODEL_TYPES)
    _choice(src, "kl_estimator", p.kl_estimator, ("k1", "k2", "k3"))
    _choice(src, "advantage_estimator", p.advantage_estimator, ADVANTAGE_ESTIMATORS)
    _choice(src, "scale_rewards", p.scale_rewards, ("group", "batch", "none"))
    _choice(src, "loss_aggregation", p.loss_aggregation, LOSS_AGGREGATIONS)
    _choice(src, "value_head_init", p.value_head_init, ("auto", "reward", "zero"))
    _choice(src, "cpu_speedups", t.cpu_speedups, ("auto", "off"))
    _choice(src, "rollout_engine", config.generation.rollout_engine, ROLLOUT_ENGINES)
    _choice(src, "rollout_compile", config.generation.rollout_compile, ("auto", "on", "off"))
    for name in report_to_list(o.report_to):
        _choice(src, "report_to", name, REPORT_TO)
    check_template_name(d.template, f"{src}: template")
    seen = o.include_num_input_tokens_seen
    if not isinstance(seen, (bool, str)) or seen not in NUM_INPUT_TOKENS_SEEN:
        raise fail(f"{src}: include_num_input_tokens_seen is {o.include_num_input_tokens_seen!r}; "
                   "allowed: true, false, non_padding, all, no")
    if t.disable_gradient_checkpointing and t.gradient_checkpointing:
        raise fail(f"{src}: gradient_checkpointing: true and disable_gradient_checkpointing: true contradict; "
                   "remove one")
    _validate_optimizer(config)
    if not m.model_name_or_path:
        raise fail(f"{src}: model_name_or_path is required; set it to a model folder")
    if not o.output_dir:
        raise fail(f"{src}: output_dir is required; set it to the folder for results")
    if not d.dataset:
        raise fail(f"{src}: dataset is required; name a dataset from dataset_info.json or a data file")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        _positive(src, key, getattr(t, key))
    for key in ("learning_rate", "adam_epsilon"):
        _positive(src, key, getattr(t, key))
    _positive(src, "num_train_epochs", t.num_train_epochs)
    _positive(src, "cutoff_len", d.cutoff_len)
    _positive(src, "lora_rank", f.lora_rank)
    _positive(src, "logging_steps", o.logging_steps)
    _positive(src, "max_bad_steps", t.max_bad_steps)
    for key in ("weight_decay", "max_grad_norm", "warmup_steps"):
        _positive(src, key, getattr(t, key), allow_zero=True)
    _positive(src, "save_steps", o.save_steps, allow_zero=True)
    _positive(src, "logits_chunk_size", t.logits_chunk_size, allow_zero=True)
    _positive(src, "stop_check_interval", config.generation.stop_check_interval)
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise fail(f"{src}: warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if not 0.0 < t.torch_compile_memory_budget <= 1.0:
        raise fail(f"{src}: torch_compile_memory_budget must be in (0, 1], got {t.torch_compile_memory_budget}")
    if not 0.0 <= f.lora_dropout < 1.0:
        raise fail(f"{src}: lora_dropout must be in [0, 1), got {f.lora_dropout}")
    if d.val_size < 0 or (d.val_size >= 1 and not float(d.val_size).is_integer()):
        raise fail(f"{src}: val_size must be a fraction in [0, 1) or a whole row count, got {d.val_size}")
    if d.max_samples is not None and d.max_samples <= 0:
        raise fail(f"{src}: max_samples must be > 0, got {d.max_samples}")
    if o.save_total_limit is not None and o.save_total_limit <= 0:
        raise fail(f"{src}: save_total_limit must be > 0 (or unset), got {o.save_total_limit}")
    if t.bf16 and t.fp16:
        raise fail(f"{src}: bf16 and fp16 are both true; choose one")
    if f.create_new_adapter and not m.adapter_name_or_path:
        raise fail(f"{src}: create_new_adapter needs adapter_name_or_path (the adapters to merge first)")
    if f.finetuning_type != "lora" and m.adapter_name_or_path and f.stage != "ppo":
        raise fail(f"{src}: adapter_name_or_path needs finetuning_type: lora (got {f.finetuning_type}); "
                   "merge the adapter with `rlhfkit export` first")
    _validate_model_keys(config)
    if f.stage == "ppo":
        _validate_ppo(config)


def _validate_model_keys(config: "Config") -> None:
    """Attention, RoPE, quantization and the LoRA variants (LLaMA-Factory's combinations)."""
    src, m, f, p = config.source, config.model, config.finetuning, config.ppo
    if m.flash_attn is not None:
        _choice(src, "flash_attn", m.flash_attn, FLASH_ATTN)
    if m.rope_scaling is not None:
        _choice(src, "rope_scaling", m.rope_scaling, ROPE_SCALINGS)
    validate_quantization(config)
    for key in ("ref_model_quantization_bit", "reward_model_quantization_bit"):
        if getattr(p, key) not in (None, 4, 8):
            raise fail(f"{src}: {key} must be 4 or 8 (bitsandbytes), got {getattr(p, key)}")
    if f.finetuning_type != "lora":
        for key in LORA_ONLY_KEYS:
            if getattr(f, key) not in (None, False):
                raise fail(f"{src}: {key} is only valid with finetuning_type: lora (got {f.finetuning_type})")
    if f.loraplus_lr_ratio is not None:
        _positive(src, "loraplus_lr_ratio", f.loraplus_lr_ratio)
    _positive(src, "loraplus_lr_embedding", f.loraplus_lr_embedding)
    if f.pissa_iter < -1:
        raise fail(f"{src}: pissa_iter must be -1 (exact SVD) or >= 0 fast-SVD iterations, got {f.pissa_iter}")
    if f.pissa_init and f.stage == "ppo":
        raise fail(f"{src}: pissa_init cannot be used with stage ppo (the reference is the base without the "
                   "adapter, which PiSSA changes); initialise PiSSA in the sft stage")


def validate_quantization(config: "Config") -> None:
    """quantization_bit with its method, type and LLaMA-Factory's restrictions on what trains on it."""
    src, m, f = config.source, config.model, config.finetuning
    if m.quantization_bit is None:
        return
    if m.quantization_method != "bnb":
        raise fail(f"{src}: quantization_method '{m.quantization_method}' is not supported; use bnb (bitsandbytes)")
    if m.quantization_bit not in (4, 8):
        raise fail(f"{src}: quantization_bit must be 4 or 8 with bitsandbytes, got {m.quantization_bit}")
    _choice(src, "quantization_type", m.quantization_type, ("nf4", "fp4"))
    if f.finetuning_type != "lora":
        raise fail(f"{src}: quantization_bit needs finetuning_type: lora (QLoRA); a quantized model cannot be "
                   f"trained with {f.finetuning_type}")
    adapters = [a for a in (m.adapter_name_or_path or "").split(",") if a.strip()]
    for bad, why in (
        (m.resize_vocab, "resize_vocab cannot resize the embeddings of a quantized model"),
        (f.pissa_init, "pissa_init cannot initialise PiSSA on a quantized model"),
        (f.create_new_adapter and adapters, "create_new_adapter cannot merge adapters into a quantized model"),
        (len(adapters) > 1, "a quantized model takes a single adapter; merge the others first with `rlhfkit export`"),
    ):
        if bad:
            raise fail(f"{src}: with quantization_bit, {why}")


def _validate_ppo(config: "Config") -> None:
    src, g, p = config.source, config.generation, config.ppo
    if not p.reward_model and not p.reward_models:
        raise fail(f"{src}: stage ppo needs reward_model (an RM folder, URL or module:callable) "
                   "or a reward_models list")
    if p.reward_model and p.reward_models:
        raise fail(f"{src}: set either reward_model or reward_models, not both")
    if p.reward_models:
        check_reward_models(src, p.reward_models)
    for key in ("ppo_epochs", "ppo_buffer_size", "kl_horizon", "max_new_tokens"):
        owner = g if key == "max_new_tokens" else p
        _positive(src, key, getattr(owner, key))
    _positive(src, "min_new_tokens", g.min_new_tokens, allow_zero=True)
    if g.min_new_tokens > g.max_new_tokens:
        raise fail(f"{src}: min_new_tokens ({g.min_new_tokens}) must not exceed max_new_tokens ({g.max_new_tokens})")
    for key in ("cliprange", "cliprange_value", "ppo_target"):
        _positive(src, key, getattr(p, key))
    for key in ("kl_coef", "vf_coef", "entropy_coef", "reward_api_timeout", "kl_loss_coef"):
        _positive(src, key, getattr(p, key), allow_zero=True)
    for key in ("cliprange_low", "cliprange_high"):
        if getattr(p, key) is None:
            setattr(p, key, p.cliprange)
        _positive(src, key, getattr(p, key))
    _positive(src, "num_generations", p.num_generations)
    if p.advantage_estimator in GROUP_ESTIMATORS and p.num_generations < 2:
        raise fail(f"{src}: advantage_estimator {p.advantage_estimator} compares the responses to one prompt; "
                   f"set num_generations to 2 or more (got {p.num_generations})")
    if p.filter_groups and p.num_generations < 2:
        raise fail(f"{src}: filter_groups needs groups; set num_generations to 2 or more")
    _positive(src, "reward_api_retries", p.reward_api_retries, allow_zero=True)
    derive_ppo_buffer_size(config)
    for key in ("gamma", "lam"):
        if not 0.0 <= getattr(p, key) <= 1.0:
            raise fail(f"{src}: {key} must be in [0, 1], got {getattr(p, key)}")
    if p.reward_clip is not None:
        _positive(src, "reward_clip", p.reward_clip)
    if g.temperature <= 0:
        raise fail(f"{src}: temperature must be > 0 for PPO sampling, got {g.temperature}")
    if not 0.0 < g.top_p <= 1.0:
        raise fail(f"{src}: top_p must be in (0, 1], got {g.top_p}")
    _positive(src, "top_k", g.top_k, allow_zero=True)
    if not g.do_sample:
        raise fail(f"{src}: PPO needs sampled rollouts; set do_sample: true")


def _validate_optimizer(config: "Config") -> None:
    """optim, the form of lr_scheduler_kwargs and of deepspeed (the schedule's arguments and the
    DeepSpeed file are checked when the run starts: `training.optim.check_optimizer`)."""
    src, t = config.source, config.training
    _choice(src, "optim", t.optim, OPTIMIZERS)
    kwargs = t.lr_scheduler_kwargs
    if isinstance(kwargs, str):  # LLaMA-Factory's web UI writes JSON text
        try:
            kwargs = json.loads(kwargs) if kwargs.strip() else None
        except json.JSONDecodeError as err:
            raise fail(f"{src}: lr_scheduler_kwargs is not valid JSON ({err.msg}); write a mapping such as "
                       '{"min_lr_rate": 0.1}') from None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise fail(f"{src}: lr_scheduler_kwargs must be a mapping such as {{min_lr_rate: 0.1}}, got {kwargs!r}")
    t.lr_scheduler_kwargs = kwargs or {}
    if t.deepspeed is not None and not isinstance(t.deepspeed, (str, dict)):
        raise fail(f"{src}: deepspeed must be the path of a DeepSpeed JSON file or a mapping, got {t.deepspeed!r}")


def check_reward_models(source: str, entries: list) -> None:
    """Each `reward_models` entry: a mapping with `path`, and optionally `type`, `name` and `weight`
    (a finite number)."""
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "path" not in entry:
            raise fail(f"{source}: reward_models[{index}] must be a mapping with at least 'path' "
                       "(and type, weight, name)")
        unknown = set(map(str, entry)) - {"path", "type", "weight", "name"}
        if unknown:
            raise fail(f"{source}: reward_models[{index}] has unknown key(s) {shown(sorted(unknown))}; "
                       "allowed: path, type, weight, name")
        _choice(source, f"reward_models[{index}].type", entry.get("type", "lora"), REWARD_MODEL_TYPES)
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise fail(f"{source}: reward_models[{index}].weight must be a finite number, got {shown(weight)}")


def derive_ppo_buffer_size(config: "Config") -> None:
    """`rollout_batch_size` as `ppo_buffer_size` mini-batches, once the micro-batch is known (it may
    be a device default, filled in later: `accelerator.defaults`)."""
    t, p = config.training, config.ppo
    if config.finetuning.stage != "ppo" or p.rollout_batch_size is None or t.per_device_train_batch_size is None:
        return
    mini = t.per_device_train_batch_size * t.gradient_accumulation_steps
    if p.rollout_batch_size <= 0 or p.rollout_batch_size % mini:
        raise fail(f"{config.source}: rollout_batch_size {p.rollout_batch_size} is not a positive multiple of "
                   f"per_device_train_batch_size x gradient_accumulation_steps = {mini}; change one of them")
    p.ppo_buffer_size = p.rollout_batch_size // mini
