"""Typed configuration: one dataclass per concern, one docstring per field.

Key names follow LLaMA-Factory so its YAML files work unchanged. Each field's docstring is the
line that appears in the configuration reference (`docs/configuration.md`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class ModelArguments:
    """Which model to load and how."""

    model_name_or_path: Optional[str] = None
    """Base model: a local folder (or a hub id where a hub is reachable). Required."""
    adapter_name_or_path: Optional[str] = None
    """Existing LoRA adapter folder(s) to load on the base, comma-separated (e.g. the SFT adapter for PPO)."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model folder. Off unless you trust the folder."""
    torch_dtype: str = "auto"
    """Weight dtype: auto (bf16/fp16 when those flags are set, else float32), float32, bfloat16, float16."""
    attn_implementation: str = "auto"
    """Attention kernel: auto, eager, sdpa, flash_attention_2."""
    flash_attn: Optional[str] = None
    """LLaMA-Factory's name for the attention kernel (auto, disabled, sdpa, fa2); maps onto attn_implementation."""
    device: str = "auto"
    """auto (accelerate picks cuda, mps or cpu; `accelerate launch` assigns one device per process) or cpu."""


@dataclass
class DataArguments:
    """Which data to read and how to turn it into tokens."""

    dataset: Optional[str] = None
    """Training dataset name(s) from dataset_info.json, or file paths, comma-separated."""
    eval_dataset: Optional[str] = None
    """Evaluation dataset name(s) or paths, comma-separated (instead of val_size)."""
    dataset_dir: str = "data"
    """Folder holding dataset_info.json and the data files."""
    template: Optional[str] = None
    """Chat template: unset or auto uses the tokenizer's own; or default, empty, chatml, llama3, qwen."""
    cutoff_len: int = 2048
    """Maximum tokens of prompt plus response; longer samples are truncated (or dropped, and counted)."""
    max_samples: Optional[int] = None
    """Use at most this many rows of each dataset."""
    val_size: float = 0.0
    """Held-out part of the training data for evaluation: a fraction in (0, 1) or a row count."""
    train_on_prompt: bool = False
    """SFT: also train on prompt tokens (labels cover only responses otherwise)."""
    mask_history: bool = False
    """SFT: train only on the last assistant turn of multi-turn conversations."""
    overlong_prompts: str = "drop"
    """PPO: prompts longer than cutoff_len are dropped and counted (drop) or stop the run (error)."""


@dataclass
class FinetuningArguments:
    """What the stage trains and which parameters."""

    stage: str = "sft"
    """Training stage: sft, rm or ppo."""
    finetuning_type: str = "lora"
    """lora (train adapters), full (all weights) or freeze (only the last layers)."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: Optional[int] = None
    """LoRA scaling alpha (default 2 x lora_rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch (forced off during PPO)."""
    lora_target: str = "all"
    """Modules that get LoRA: all (every linear layer but the LM head) or comma-separated module names."""
    additional_target: Optional[str] = None
    """Extra modules trained fully besides LoRA, comma-separated (e.g. embed_tokens)."""
    create_new_adapter: bool = False
    """Merge the adapters of adapter_name_or_path into the base, then train a fresh adapter on top."""
    freeze_trainable_layers: int = 2
    """freeze: number of last (positive) or first (negative) decoder layers to train."""
    freeze_trainable_modules: str = "all"
    """freeze: module names inside the trainable layers to train (all, or comma-separated)."""


@dataclass
class TrainingArguments:
    """Optimisation loop settings."""

    per_device_train_batch_size: Optional[int] = None
    """Samples per micro-batch per process (PPO: per forward/backward pass in the update); unset: 1 on a CPU, 8 on an accelerator (set it to run the same batches everywhere)."""
    per_device_eval_batch_size: Optional[int] = None
    """Samples per evaluation batch per process (also the chunk size of PPO's evaluate and scoring passes); unset: 8 on a CPU, 32 on an accelerator."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated into one optimizer step."""
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW."""
    num_train_epochs: float = 3.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Total optimizer steps (PPO: PPO steps, one rollout batch each); -1 derives it from num_train_epochs."""
    lr_scheduler_type: str = "linear"
    """LR schedule after warm-up: linear, cosine, constant, constant_with_warmup, polynomial, inverse_sqrt, ..."""
    warmup_ratio: float = 0.0
    """Fraction of the total steps used for linear warm-up."""
    warmup_steps: int = 0
    """Warm-up steps (overrides warmup_ratio when > 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int = 42
    """Seed for data order, initialisation and sampling."""
    bf16: bool = False
    """Compute in bfloat16 (trainable parameters stay float32)."""
    fp16: bool = False
    """Compute in float16 (trainable parameters stay float32)."""
    logits_chunk_size: Optional[int] = None
    """Positions whose vocabulary logits exist at once in PPO's and SFT's training and evaluation passes: the LM head and log-softmax run in chunks of this many positions, gradients exact (0: off, one whole-tensor pass); unset: 0 on a CPU (its kept buffers are faster), 1024 on an accelerator."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    torch_compile: bool = False
    """Compile each transformer block with torch.compile (fused kernels, fewer saved activations) after a one-off compilation on the first steps; generation stays eager."""
    torch_compile_memory_budget: float = 1.0
    """With torch_compile: the activations the compiled blocks save for the backward pass, as a fraction (0, 1] of what the fastest plan saves; below 1 the cheapest operations (norms, activations, elementwise; at low budgets products too) are recomputed in the backward pass instead (PyTorch's activation_memory_budget)."""
    eval_steps: Optional[int] = None
    """Evaluate every this many steps (default: only at the end)."""
    resume_from_checkpoint: Any = None
    """Resume from a checkpoint: true (the latest in output_dir, or a fresh start if none) or a checkpoint folder."""
    max_bad_steps: int = 5
    """Stop after this many consecutive updates skipped for NaN/Inf loss, gradients or rewards."""
    cpu_speedups: str = "auto"
    """CPU-only speed-ups (malloc settings and huge pages, kept gradient and vocabulary buffers, sparse embedding gradients, lean LoRA decode, inverse-CDF sampling): auto (on for a CPU device in one process) or off. Results are the same up to float rounding."""


@dataclass
class GenerationArguments:
    """Sampling settings for PPO rollouts (and chat)."""

    do_sample: bool = True
    """Sample (true) or decode greedily (false)."""
    temperature: float = 0.95
    """Sampling temperature; PPO log-probs use the same temperature."""
    top_p: float = 0.7
    """Nucleus sampling threshold (1.0 disables)."""
    top_k: int = 50
    """Top-k sampling (0 disables)."""
    max_new_tokens: int = 1024
    """Maximum tokens generated per response."""
    min_new_tokens: int = 0
    """Stop tokens cannot end a response before this many tokens (= max_new_tokens: fixed-length responses, as the benchmarks use)."""
    repetition_penalty: float = 1.0
    """Repetition penalty (1.0 disables)."""
    stop_words: Optional[str] = None
    """Extra stop strings, comma-separated; a response is cut after the first one (EOS always stops)."""
    rollout_engine: str = "auto"
    """PPO's rollout engine: recording (the decode loop that also records log-probs and values), static (static KV cache, decode step compiled on CUDA, LoRA decoded on a merged copy), or auto (static on CUDA, recording elsewhere)."""
    rollout_compile: str = "auto"
    """static engine: compile the per-token decode step with torch.compile (mode reduce-overhead: CUDA graphs on CUDA): auto (on CUDA only), on or off."""
    stop_check_interval: int = 8
    """static engine: look for rows still running every this many tokens (one host synchronisation each), not after every token."""


@dataclass
class PPOArguments:
    """PPO: reward sources, reference, and every knob of the algorithm."""

    reward_model: Optional[str] = None
    """Reward model: an RM adapter folder (lora), a model folder (full), a URL (api) or module:callable (function)."""
    reward_model_type: str = "lora"
    """How to use reward_model: lora, full, api or function."""
    reward_models: Optional[list] = None
    """Several reward sources: a list of {path, type, weight, name}; scores are summed with their weights."""
    ref_model: Optional[str] = None
    """Explicit reference model folder (default: the policy's base with adapters disabled, or a frozen copy)."""
    ref_model_adapters: Optional[str] = None
    """Adapter(s) to load on ref_model."""
    value_head_init: str = "auto"
    """Value head start: reward (copy the RM's head), zero, or auto (reward when the RM shares the base)."""
    advantage_estimator: str = "gae"
    """How rewards become advantages: gae (PPO with the value head as critic), or critic-free (no value head): grpo, dr_grpo, rloo, reinforce_plus_plus, reinforce_plus_plus_baseline."""
    num_generations: int = 1
    """Responses sampled per prompt (G); batch sizes count prompts, so a rollout batch of B prompts holds B x G responses. At least 2 for grpo, dr_grpo, rloo and reinforce_plus_plus_baseline."""
    scale_rewards: str = "group"
    """grpo: divide each advantage by the std of its group's scores (group), of the whole batch's (batch), or not at all (none)."""
    filter_groups: bool = False
    """Drop groups whose scores are all equal (they carry no signal for a group estimator) from the update; logged as filtered_groups."""
    ppo_epochs: int = 4
    """Optimisation passes over each rollout batch."""
    logprobs_from_rollout: bool = True
    """Take the policy's old log-probs and values from the sampling passes (equal to a separate forward pass up to float rounding); false runs that pass."""
    ppo_buffer_size: int = 1
    """Mini-batches per rollout batch: rollout batch = per_device_train_batch_size x gradient_accumulation_steps x ppo_buffer_size."""
    rollout_batch_size: Optional[int] = None
    """Prompts per PPO step per process, instead of ppo_buffer_size; must be a multiple of per_device_train_batch_size x gradient_accumulation_steps."""
    ppo_score_norm: bool = False
    """Normalise scores with a running mean/std across all processes."""
    ppo_whiten_rewards: bool = False
    """Whiten the shaped per-token rewards of each batch, keeping their mean."""
    whiten_advantages: bool = True
    """Whiten advantages (shift to mean 0, scale to std 1) over the batch's response tokens."""
    ppo_target: float = 6.0
    """Target KL (nats per response) of the adaptive KL controller."""
    kl_coef: float = 0.2
    """Initial (or fixed) KL coefficient beta."""
    adaptive_kl: bool = True
    """Adapt beta towards ppo_target (Ziegler et al. 2019); false keeps beta fixed."""
    kl_horizon: int = 10000
    """Horizon of the adaptive KL controller, in samples."""
    kl_estimator: str = "k1"
    """Per-token KL estimator: k1 (log ratio), k2 (half its square) or k3 (non-negative, lower variance)."""
    kl_in_reward: bool = True
    """Put -kl_coef x KL into each token's reward (PPO's penalty); false leaves the reward to the scores."""
    kl_loss_coef: float = 0.0
    """Weight of a KL-to-reference loss term, as GRPO uses it (0 disables); usually with kl_in_reward: false."""
    loss_aggregation: str = "token_mean"
    """How per-token policy losses become one: token_mean, seq_mean_token_mean, seq_mean_token_sum, or seq_mean_token_sum_norm (Dr. GRPO: the token sum over rows x max_new_tokens)."""
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """Lambda of GAE."""
    cliprange: float = 0.2
    """Clip range of the policy probability ratio."""
    cliprange_low: Optional[float] = None
    """Lower clip range of the ratio, 1 - cliprange_low (default: cliprange)."""
    cliprange_high: Optional[float] = None
    """Upper clip range of the ratio, 1 + cliprange_high (default: cliprange; DAPO's clip-higher sets it above)."""
    cliprange_value: float = 0.2
    """Clip range of the value prediction around the rollout's value."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (0 disables)."""
    reward_clip: Optional[float] = None
    """Clip scores to [-reward_clip, reward_clip] after normalisation (unset disables)."""
    missing_eos_penalty: Optional[float] = None
    """Subtract this from the score of responses that never produced EOS (unset disables)."""
    reward_api_timeout: float = 30.0
    """Seconds before an HTTP reward request times out."""
    reward_api_retries: int = 3
    """Retries of a failed HTTP reward request (exponential backoff) before the run stops."""


@dataclass
class OutputArguments:
    """Where results go and what is recorded."""

    output_dir: Optional[str] = None
    """Folder for the trained weights, logs and checkpoints. Required."""
    overwrite_output_dir: bool = False
    """Allow writing into a non-empty output_dir."""
    logging_steps: int = 10
    """Log statistics every this many steps."""
    save_steps: int = 500
    """Write a checkpoint every this many steps (0 disables)."""
    save_total_limit: Optional[int] = None
    """Keep at most this many checkpoints (oldest pruned first)."""
    report_to: Any = "none"
    """Loggers besides trainer_log.jsonl: none or tensorboard."""
    plot_loss: bool = False
    """Write PNG curves of the logged statistics at the end."""


@dataclass
class ExportArguments:
    """`rlhfkit export`: merge LoRA adapters into the base and save a standalone model."""

    export_dir: Optional[str] = None
    """Folder for the exported model (weights, tokenizer, generation config). Required by `rlhfkit export`."""
    export_size: float = 5.0
    """Largest weight file in GB; bigger models are split into shards with an index (fractions allowed)."""
    export_legacy_format: bool = False
    """Write PyTorch .bin files instead of safetensors; not supported (transformers 5 writes only safetensors)."""
    export_device: str = "cpu"
    """Where the adapters are merged: cpu, or auto (the accelerator accelerate finds)."""


SECTIONS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "finetuning": FinetuningArguments,
    "training": TrainingArguments,
    "generation": GenerationArguments,
    "ppo": PPOArguments,
    "output": OutputArguments,
    "export": ExportArguments,
}

# LLaMA-Factory keys accepted so its files work unchanged, with why they change nothing here.
IGNORED_KEYS: dict[str, str] = {
    "do_train": "the stage always trains",
    "do_eval": "evaluation runs when val_size or eval_dataset is set",
    "do_predict": "use `rlhfkit eval` for prediction",
    "overwrite_cache": "datasets are tokenized in memory, no cache is kept",
    "preprocessing_num_workers": "tokenization runs in the main process",
    "dataloader_num_workers": "batches are built in the main process",
    "ddp_timeout": "set the timeout through accelerate's config",
    "eval_strategy": "evaluation follows eval_steps",
    "evaluation_strategy": "evaluation follows eval_steps",
    "save_strategy": "checkpoints follow save_steps",
    "save_only_model": "checkpoints always hold everything needed to resume",
    "logging_dir": "logs are written into output_dir",
    "use_fast_tokenizer": "fast tokenizers are always used",
    "skip_special_tokens": "special tokens are always skipped when decoding",
    "streaming": "datasets are read into memory",
    "run_name": "runs are named by output_dir",
    "disable_tqdm": "the progress bar hides itself when the output is not a terminal",
}
