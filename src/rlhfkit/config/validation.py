"""Range and combination checks, each with a message that names the key and what is allowed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhfkit.errors import fail

if TYPE_CHECKING:
    from rlhfkit.config.loader import Config

STAGES = ("sft", "rm", "ppo")
FINETUNING_TYPES = ("lora", "full", "freeze")
REWARD_MODEL_TYPES = ("lora", "full", "api", "function")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
    "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
)
REPORT_TO = ("none", "tensorboard")
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline")
ROLLOUT_ENGINES = ("auto", "recording", "static")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def _choice(source: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise fail(f"{source}: {key} is '{value}'; allowed: {', '.join(allowed)}")


def _positive(source: str, key: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:  # a device-dependent default, filled in once the device is known
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise fail(f"{source}: {key} must be {bound}, got {value}")


def report_to_list(value) -> list[str]:
    """`report_to` as a list of logger names ('none' removed)."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [v.strip() for v in items if v and v.strip() and v.strip() != "none"]


def validate(config: "Config") -> None:
    """Check ranges and combinations; raise RlhfkitError naming the key(s) at fault."""
    src = config.source
    m, d, f, t, g, p, o = (config.model, config.data, config.finetuning, config.training,
                           config.generation, config.ppo, config.output)
    _choice(src, "stage", f.stage, STAGES)
    _choice(src, "finetuning_type", f.finetuning_type, FINETUNING_TYPES)
    _choice(src, "torch_dtype", m.torch_dtype, DTYPES)
    _choice(src, "device", m.device, ("auto", "cpu"))
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
    if f.stage == "ppo":
        _validate_ppo(config)


def _validate_ppo(config: "Config") -> None:
    src, t, g, p = config.source, config.training, config.generation, config.ppo
    if not p.reward_model and not p.reward_models:
        raise fail(f"{src}: stage ppo needs reward_model (an RM folder, URL or module:callable) "
                   "or a reward_models list")
    if p.reward_model and p.reward_models:
        raise fail(f"{src}: set either reward_model or reward_models, not both")
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
