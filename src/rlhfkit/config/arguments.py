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
    """Base model: a local folder or a Hugging Face Hub id (downloaded, or read from the hub cache offline). Required."""
    adapter_name_or_path: Optional[str] = None
    """Existing LoRA adapter folder(s) or hub ids to load on the base, comma-separated (e.g. the SFT adapter for PPO)."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model folder. Off unless you trust the folder."""
    torch_dtype: str = "auto"
    """Weight dtype: auto (bf16/fp16 when those flags are set, else float32), float32, bfloat16, float16."""
    attn_implementation: str = "auto"
    """Attention kernel: auto, eager, sdpa, flash_attention_2 (needs pip install flash-attn and CUDA)."""
    flash_attn: Optional[str] = None
    """LLaMA-Factory's name for the attention kernel: auto, disabled (eager), sdpa, fa2 (flash_attention_2); used when attn_implementation is auto."""
    device: str = "auto"
    """auto (accelerate picks cuda, mps or cpu; `accelerate launch` assigns one device per process) or cpu."""
    cache_dir: Optional[str] = None
    """Hugging Face Hub cache folder for models, adapters, reward models and hf_hub_url datasets (default: the hub's, under HF_HOME)."""
    model_revision: str = "main"
    """Hub revision (branch, tag or commit) of model_name_or_path, adapters and reward models given as hub ids."""
    hf_hub_token: Optional[str] = None
    """Hugging Face token for gated or private repositories and for pushing (default: HF_TOKEN or the saved login)."""
    rope_scaling: Optional[str] = None
    """RoPE scaling when cutoff_len exceeds the model's max_position_embeddings: linear, dynamic, yarn or llama3 (factor ceil(cutoff_len / max_position_embeddings); 2 outside training)."""
    resize_vocab: bool = False
    """Resize the embeddings to the tokenizer's length rounded up to a multiple of 64; with LoRA the embedding and output layers then train fully (unless additional_target names modules)."""
    quantization_bit: Optional[int] = None
    """QLoRA: load the base model in 4 or 8 bits with bitsandbytes (pip install bitsandbytes); finetuning_type lora only."""
    quantization_method: str = "bnb"
    """On-the-fly quantization library: bnb (bitsandbytes) only."""
    quantization_type: str = "nf4"
    """4-bit data type: nf4 or fp4."""
    double_quantization: bool = True
    """4-bit: also quantize the quantization constants (saves about 0.4 bits per weight)."""
    infer_backend: str = "huggingface"
    """Generation engine of `rlhfkit chat` (LLaMA-Factory's key): huggingface (transformers' generate) only."""
    infer_dtype: str = "auto"
    """Weight dtype of `rlhfkit chat` and `rlhfkit eval` (auto: float32 on the CPU, the checkpoint's own on an accelerator) and, unless torch_dtype is set, of `rlhfkit export` (auto: the checkpoint's own); or float32, bfloat16, float16."""


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
    """Chat template: unset or auto uses the tokenizer's own; or a LLaMA-Factory name (llama3, qwen3, ...; docs/data.md)."""
    default_system: Optional[str] = None
    """System prompt for conversations without one, replacing the template's default."""
    enable_thinking: Optional[bool] = True
    """Reasoning templates (qwen3, ...): train and prompt with thinking; false strips thoughts and prompts an empty one."""
    preserve_thinking: bool = False
    """Reasoning templates: keep the thoughts of earlier replies in prompts (and with mask_history)."""
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
    use_dora: bool = False
    """LoRA: weight-decomposed low-rank adaptation (DoRA), a trained magnitude per output row besides A and B."""
    use_rslora: bool = False
    """LoRA: rank-stabilised scaling lora_alpha / sqrt(lora_rank) instead of lora_alpha / lora_rank."""
    loraplus_lr_ratio: Optional[float] = None
    """LoRA+: the B matrices (and other 1-D trainable tensors, as LLaMA-Factory and peft group them) learn at learning_rate x this ratio (unset disables)."""
    loraplus_lr_embedding: float = 1e-6
    """LoRA+: learning rate of the B matrices of LoRA on embedding layers."""
    pissa_init: bool = False
    """LoRA: initialise the adapter from the principal singular vectors of each weight (PiSSA); the base keeps the residual."""
    pissa_iter: int = 16
    """PiSSA: fast-SVD iterations (-1: an exact SVD)."""
    pissa_convert: bool = False
    """PiSSA: also save the adapter converted to a plain LoRA adapter of the original base, in output_dir/pissa_converted."""


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
    """Peak learning rate."""
    num_train_epochs: float = 3.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Total optimizer steps (PPO: PPO steps, one rollout batch each); -1 derives it from num_train_epochs."""
    optim: str = "adamw_torch"
    """Optimizer: adamw_torch, adamw_torch_fused, adamw_8bit or paged_adamw_8bit (bitsandbytes), adafactor or sgd."""
    lr_scheduler_type: str = "linear"
    """LR schedule after warm-up: linear, cosine, cosine_with_min_lr, cosine_warmup_with_min_lr, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, warmup_stable_decay."""
    lr_scheduler_kwargs: Any = None
    """Extra arguments of the schedule, a mapping or its JSON text: e.g. {"min_lr_rate": 0.1} (cosine_with_min_lr needs min_lr or min_lr_rate); warmup_stable_decay defaults to LLaMA-Factory's 1/3 stable, 2/3 decay."""
    warmup_ratio: float = 0.0
    """Fraction of the total steps used for linear warm-up."""
    warmup_steps: int = 0
    """Warm-up steps (overrides warmup_ratio when > 0)."""
    weight_decay: float = 0.0
    """Weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1 (adamw_* optimizers)."""
    adam_beta2: float = 0.999
    """AdamW beta2 (adamw_* optimizers)."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon (adamw_* optimizers)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int = 42
    """Seed for data order, initialisation and sampling."""
    bf16: bool = False
    """Compute in bfloat16 (trainable parameters stay float32)."""
    fp16: bool = False
    """Compute in float16 (trainable parameters stay float32)."""
    tf32: Optional[bool] = None
    """On CUDA: float32 matrix products and convolutions on TF32 tensor cores (true: several times faster, products rounded to 10 mantissa bits) or in full float32 (false); unset keeps PyTorch's setting (full float32). Other devices: no effect."""
    logits_chunk_size: Optional[int] = None
    """Positions whose vocabulary logits exist at once in PPO's and SFT's training and evaluation passes: the LM head and log-softmax run in chunks of this many positions, gradients exact (0: off, one whole-tensor pass); unset: 0 on a CPU (its kept buffers are faster), 1024 on an accelerator."""
    gradient_checkpointing: Optional[bool] = None
    """Recompute activations in the backward pass to save memory; unset: on unless disable_gradient_checkpointing (LLaMA-Factory's default), false: off."""
    disable_gradient_checkpointing: bool = False
    """LLaMA-Factory's switch: true turns gradient checkpointing off (when gradient_checkpointing is unset)."""
    torch_compile: bool = False
    """Compile each transformer block with torch.compile (fused kernels, fewer saved activations) after a one-off compilation on the first steps; generation stays eager."""
    torch_compile_memory_budget: float = 1.0
    """With torch_compile: the activations the compiled blocks save for the backward pass, as a fraction (0, 1] of what the fastest plan saves; below 1 the cheapest operations (norms, activations, elementwise; at low budgets products too) are recomputed in the backward pass instead (PyTorch's activation_memory_budget)."""
    eval_steps: Optional[int] = None
    """Evaluate every this many steps (default: only at the end)."""
    resume_from_checkpoint: Any = None
    """Resume from a checkpoint: true (the latest whole one in output_dir, or a fresh start if none) or a checkpoint folder; the config must match the one that wrote it."""
    resume_ignore_config_changes: bool = False
    """Resume even though trajectory keys (learning rate, schedule, data, batch sizes, seed, models, ...) changed since the checkpoint: listed in a warning, they take effect from the checkpoint on (not the LoRA shape or finetuning_type)."""
    max_bad_steps: int = 5
    """Stop (exit 2) after this many updates in a row skipped for NaN/Inf loss, gradients or rewards."""
    deepspeed: Any = None
    """DeepSpeed config, a JSON file or a mapping, applied through accelerate's DeepSpeedPlugin; needs the deepspeed package, an accelerator and a launcher (accelerate launch, torchrun or deepspeed)."""
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
    """Reward model: an RM adapter folder or hub id (lora), a model folder or hub id (full), a URL (api) or module:callable (function)."""
    reward_model_type: str = "lora"
    """How to use reward_model: lora, full, api or function."""
    reward_models: Optional[list] = None
    """Several reward sources: a list of {path, type, weight, name}; scores are summed with their weights."""
    ref_model: Optional[str] = None
    """Explicit reference model folder (default: the policy's base with adapters disabled, or a frozen copy)."""
    ref_model_adapters: Optional[str] = None
    """Adapter(s) to load on ref_model."""
    ref_model_quantization_bit: Optional[int] = None
    """Load ref_model in 4 or 8 bits with bitsandbytes."""
    reward_model_quantization_bit: Optional[int] = None
    """Load full reward models in 4 or 8 bits with bitsandbytes."""
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
    """Seconds an HTTP reward request may take in all (resolving the host name, connecting and every read) before it times out."""
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
    """Trackers besides trainer_log.jsonl, one or a list: none, all (each of the following that is installed), tensorboard, wandb, mlflow, swanlab."""
    run_name: Optional[str] = None
    """Name of the run in wandb, mlflow and swanlab (default: output_dir)."""
    include_num_input_tokens_seen: Any = False
    """Log num_input_tokens_seen, the training tokens so far summed over processes: true or non_padding counts non-padding tokens, all counts padding too."""
    use_swanlab: bool = False
    """LLaMA-Factory's SwanLab switch: true adds swanlab to report_to."""
    swanlab_project: Optional[str] = None
    """SwanLab project (default: rlhfkit)."""
    swanlab_workspace: Optional[str] = None
    """SwanLab workspace (default: your own)."""
    swanlab_run_name: Optional[str] = None
    """SwanLab experiment name (default: run_name)."""
    swanlab_mode: Optional[str] = None
    """SwanLab mode: cloud, local, offline or disabled (default: SwanLab's)."""
    plot_loss: bool = False
    """Write PNG curves of the logged statistics at the end."""
    push_to_hub: bool = False
    """Upload the trained weights in output_dir (checkpoints excluded) to the Hugging Face Hub at the end."""
    hub_model_id: Optional[str] = None
    """Hub repository for push_to_hub, e.g. user/name (default: output_dir's folder name under your account)."""
    hub_private_repo: Optional[bool] = None
    """Create the push_to_hub repository private (default: the Hub's default, public)."""


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
    export_hub_model_id: Optional[str] = None
    """Also upload the exported model to this Hugging Face Hub repository, e.g. user/name."""


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
    "disable_tqdm": "the progress bar hides itself when the output is not a terminal",
    "logging_first_step": "step 1 is always logged",
    "save_safetensors": "weights are always saved as safetensors",
    "use_reentrant_gc": "gradient checkpointing is always non-reentrant (the same gradients)",
    "gradient_checkpointing_kwargs": "gradient checkpointing is always non-reentrant (the same gradients)",
    "ddp_find_unused_parameters": "DDP is set up by accelerate",
    "predict_with_generate": "`rlhfkit eval` generates",
    "max_length": "replies are limited by max_new_tokens (LLaMA-Factory ignores max_length too while max_new_tokens is set)",
    "preprocessing_batch_size": "tokenization runs in the main process",
    "use_kv_cache": "generation always uses the KV cache",
    "low_cpu_mem_usage": "transformers 5 always loads weights this way",
    "print_param_status": "the trainable parameter count is always logged",
    "logging_strategy": "logging follows logging_steps",
    "dataloader_pin_memory": "batches are built in the main process",
    "remove_unused_columns": "datasets are read by their dataset_info.json columns",
    **{key: "a setting for vision and audio models, which are not supported; no effect on text models (nor in "
            "LLaMA-Factory)"
       for key in ("freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model", "image_max_pixels",
                   "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches", "video_max_pixels",
                   "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video", "audio_sampling_rate",
                   "media_dir")},
    **{key: "a setting of LLaMA-Factory's dpo and kto stages; no effect in sft, rm and ppo (nor in LLaMA-Factory)"
       for key in ("pref_beta", "pref_ftx", "pref_bco_weight", "pref_loss", "dpo_label_smoothing", "kto_chosen_weight",
                   "kto_rejected_weight", "simpo_gamma", "ld_alpha")},
}

# LLaMA-Factory keys accepted only at the value that changes nothing (its default; unset counts too):
# key -> (that value, why another value is refused).
DEFAULT_ONLY_KEYS: dict[str, tuple[Any, str]] = {
    "packing": (False, "sequences are padded per micro-batch, never packed"),
    "neat_packing": (False, "sequences are padded per micro-batch, never packed"),
    "neftune_noise_alpha": (0, "NEFTune embedding noise is not implemented"),
    "use_galore": (False, "the GaLore optimizer is not implemented; optim lists the optimizers"),
    "use_apollo": (False, "the APOLLO optimizer is not implemented; optim lists the optimizers"),
    "use_badam": (False, "the BAdam optimizer is not implemented; optim lists the optimizers"),
    "use_adam_mini": (False, "the Adam-mini optimizer is not implemented; optim lists the optimizers"),
    "use_muon": (False, "the Muon optimizer is not implemented; optim lists the optimizers"),
    "use_llama_pro": (False, "LLaMA Pro block expansion is not implemented"),
    "use_dft_loss": (False, "the SFT loss is token cross-entropy only"),
    "use_asft_loss": (False, "the SFT loss is token cross-entropy only"),
    "use_eaft_loss": (False, "the SFT loss is token cross-entropy only"),
    "pure_bf16": (False, "trainable weights and optimizer state stay float32; bf16: true computes in bfloat16"),
    "use_unsloth": (False, "Unsloth is not integrated"),
    "use_unsloth_gc": (False, "Unsloth is not integrated"),
    "enable_liger_kernel": (False, "Liger kernels are not integrated; torch_compile fuses each block"),
    "upcast_layernorm": (False, "frozen norms keep the weights' dtype (trainable weights are float32)"),
    "upcast_lmhead_output": (False, "losses and log-probabilities always take the softmax in float32"),
    "shift_attn": (False, "shift short attention (S^2-Attn) is not implemented"),
    "mixture_of_depths": (None, "mixture-of-depths conversion is not implemented"),
    "disable_shuffling": (False, "the training data is always shuffled (by seed)"),
    "load_best_model_at_end": (False, "the saved model is the last step's; checkpoints keep the others"),
    "early_stopping_steps": (None, "early stopping is not implemented"),
    "tokenized_path": (None, "tokenized datasets are not cached"),
    "freeze_extra_modules": (None, "freeze trains only the layers named by freeze_trainable_layers"),
    "swanlab_api_key": (None, "keep keys out of configs: set SWANLAB_API_KEY or run `swanlab login`"),
    "swanlab_logdir": (None, "SwanLab's local logs go where SwanLab puts them"),
    "swanlab_lark_webhook_url": (None, "SwanLab's Lark notifications are not set up"),
    "swanlab_lark_secret": (None, "SwanLab's Lark notifications are not set up"),
    "tool_format": (None, "tool calls are rendered by the tokenizer's own chat template (template: auto)"),
    "ignore_pad_token_for_loss": (True, "padding never counts in a loss"),
    "mix_strategy": ("concat", "several datasets are concatenated"),
    "interleave_probs": (None, "several datasets are concatenated, never interleaved"),
    "eval_on_each_dataset": (False, "the evaluation sets are evaluated together"),
    "compute_accuracy": (False, "SFT evaluation reports eval_loss only"),
    "include_effective_tokens_per_second": (False, "include_num_input_tokens_seen logs the tokens seen"),
    "train_from_scratch": (False, "training starts from the model's weights"),
    "split_special_tokens": (False, "special tokens written in the text are encoded as those tokens"),
    "add_tokens": (None, "add the tokens to the tokenizer folder instead"),
    "add_special_tokens": (None, "add the tokens to the tokenizer folder instead"),
    "new_special_tokens_config": (None, "add the tokens to the tokenizer folder instead"),
    "adapter_folder": (None, "give the adapter's subfolder as its path"),
    "ms_hub_token": (None, "the ModelScope hub is not used; download the model and give its folder"),
    "om_hub_token": (None, "the Modelers hub is not used; download the model and give its folder"),
    "quantization_device_map": (None, "each process loads the quantized model onto its own device"),
    "reward_model_adapters": (None, "merge the adapters into the reward model first: rlhfkit export with stage: rm"),
    **{key: (None, "GPTQ export is not implemented; quantize the exported model with optimum or gptqmodel")
       for key in ("export_quantization_bit", "export_quantization_dataset")},
    "export_quantization_nsamples": (128, "GPTQ export is not implemented"),
    "export_quantization_maxlen": (1024, "GPTQ export is not implemented"),
    "num_beams": (1, "beam search is not implemented; replies are sampled or greedy"),
    "length_penalty": (1.0, "it applies to beam search, which is not implemented"),
}
