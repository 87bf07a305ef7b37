"""`rlhfkit eval CONFIG.yaml [key=value ...] [--baseline DIR]`: score a policy on a prompt dataset.

Keys are the training keys: the policy (`model_name_or_path`, `adapter_name_or_path`), the
prompts (`dataset`, `dataset_dir`, `template`, `cutoff_len`, `max_samples`), the reward
source(s) (`reward_model` + `reward_model_type`, or `reward_models`), sampling (`do_sample`,
`temperature`, `top_p`, `top_k`, `max_new_tokens`, ...), `per_device_eval_batch_size`, `seed`
and `output_dir`.

1. check      model, dataset, a reward source and output_dir are set; output_dir's lock taken
              (held to the end, as a training run holds it), then no earlier results there
2. prompts    read, template and tokenize the dataset's prompts
3. models     the policy (adapters merged) and the reward sources (a LoRA RM on its own base copy)
4. sample     one response per prompt, seeded, so runs with the same config see the same prompts
              and the same sampling noise: two policies are compared on equal terms
5. score      each source's raw score; `reward` is their weighted sum (no normalisation, clipping
              or EOS penalty: those shape PPO's training signal, not the evaluation)
6. summarise  mean, std and 95% bootstrap interval of each score, the response length and the
              share ending with EOS; with --baseline, paired differences to an earlier eval
7. save       output_dir/eval_results.json and eval_samples.jsonl (one line per prompt)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from rlhfkit.accelerator.defaults import apply_device_defaults
from rlhfkit.commands.inference import inference_device, load_for_inference
from rlhfkit.hub import resolve_config_paths
from rlhfkit.config import Config
from rlhfkit.cpu.speedups import CpuSpeedups
from rlhfkit.data import collate_prompts, load_examples, resolve_datasets, template_for, tokenize_prompts
from rlhfkit.errors import fail
from rlhfkit.models.adapters import split_paths
from rlhfkit.rewards.base import build_scoring_batch
from rlhfkit.rollout import HFGenerator
from rlhfkit.run_lock import OutputLock
from rlhfkit.stages.ppo_models import PPOModels, build_reward_source, reward_specs
from rlhfkit.tracking.summary import summarize
from rlhfkit.training.runtime import check_one_process, check_output_dir, seed_everything

logger = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.json"
SAMPLES_FILE = "eval_samples.jsonl"


def check_eval_config(config: Config) -> None:
    """Validate the keys eval reads; messages name the key and what to do."""
    src, m, d, g, p, o = (config.source, config.model, config.data, config.generation, config.ppo, config.output)
    for key, value, what in (("model_name_or_path", m.model_name_or_path, "the base model folder"),
                             ("dataset", d.dataset, "a prompt dataset"),
                             ("output_dir", o.output_dir, "the folder for eval_results.json")):
        if not value:
            raise fail(f"{src}: {key} is required; set it to {what}")
    if not p.reward_model and not p.reward_models:
        raise fail(f"{src}: eval needs reward_model (an RM folder, URL or module:callable) or a reward_models list")
    if p.reward_model and p.reward_models:
        raise fail(f"{src}: set either reward_model or reward_models, not both")
    if p.reward_model_type not in ("lora", "full", "api", "function"):
        raise fail(f"{src}: reward_model_type is '{p.reward_model_type}'; allowed: lora, full, api, function")
    if g.max_new_tokens <= 0:
        raise fail(f"{src}: max_new_tokens must be > 0, got {g.max_new_tokens}")
    if config.training.per_device_eval_batch_size is not None and config.training.per_device_eval_batch_size <= 0:
        raise fail(f"{src}: per_device_eval_batch_size must be > 0, got {config.training.per_device_eval_batch_size}")
    if g.do_sample and g.temperature <= 0:
        raise fail(f"{src}: temperature must be > 0 when do_sample is true, got {g.temperature}")
    if g.do_sample and not 0.0 < g.top_p <= 1.0:
        raise fail(f"{src}: top_p must be in (0, 1], got {g.top_p}")


def _check_no_results(config: Config, output_dir: Path) -> None:
    """Refuse to replace an earlier eval's results unless overwriting (checked under output_dir's lock)."""
    results = output_dir / RESULTS_FILE
    if results.exists() and not config.output.overwrite_output_dir:
        raise fail(f"{config.source}: {results} exists; set overwrite_output_dir: true or choose another output_dir")


def _load_prompts(config: Config, tokenizer, template) -> list[dict[str, Any]]:
    d = config.data
    specs = resolve_datasets(d.dataset, d.dataset_dir, config.model.cache_dir, config.model.hf_hub_token)
    examples = load_examples(specs, "prompt", d.max_samples)
    items, stats = tokenize_prompts(examples, tokenizer, template, d.cutoff_len, d.overlong_prompts)
    logger.info("eval dataset %s: %s", d.dataset, stats.summary())
    if not items:
        raise fail(f"dataset {d.dataset}: no usable prompts with cutoff_len={d.cutoff_len}; raise cutoff_len")
    return items


@torch.no_grad()
def sample_and_score(model, tokenizer, template, items: list[dict], sources: list[tuple[Any, float]],
                     config: Config) -> list[dict[str, Any]]:
    """One row per prompt: prompt, response, raw score per source, weighted `reward`, length, EOS."""
    device = next(model.parameters()).device
    generator = HFGenerator(tokenizer, config.generation, template.stop_token_ids(tokenizer),
                            speedups=CpuSpeedups.for_sampling(config.training.cpu_speedups, device))
    batch_size = config.training.per_device_eval_batch_size
    rows: list[dict[str, Any]] = []
    for begin in range(0, len(items), batch_size):
        chunk = items[begin:begin + batch_size]
        prompts = collate_prompts(chunk, tokenizer.pad_token_id)
        query_ids, query_mask = prompts["input_ids"].to(device), prompts["attention_mask"].to(device)  # (b, P)
        generated = generator.generate(model, query_ids, query_mask)
        response_ids, response_mask = generated.response_ids, generated.response_mask  # (b, R)
        batch = build_scoring_batch(tokenizer, template, chunk, query_ids, query_mask, response_ids, response_mask)
        responses = batch.responses
        raw = {source.name: source.score(batch) for source, _ in sources}
        total = sum(weight * raw[source.name] for source, weight in sources)
        lengths = response_mask.sum(-1).tolist()
        ended = generated.ended_with_stop.tolist()
        for i in range(len(chunk)):
            rows.append({"prompt": batch.prompts[i], "response": responses[i],
                         "scores": {name: float(values[i]) for name, values in raw.items()},
                         "reward": float(total[i]), "response_length": int(lengths[i]),
                         "ended_with_eos": bool(ended[i])})
    return rows


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-sample numbers by name: reward, score/<source>, response_length, ended_with_eos."""
    columns = {"reward": [r["reward"] for r in rows]}
    for name in rows[0]["scores"]:
        columns[f"score/{name}"] = [r["scores"][name] for r in rows]
    columns["response_length"] = [float(r["response_length"]) for r in rows]
    columns["ended_with_eos"] = [float(r["ended_with_eos"]) for r in rows]
    return columns


def read_eval_samples(directory: str | Path) -> list[dict[str, Any]]:
    """The rows of an earlier eval's eval_samples.jsonl."""
    path = Path(directory) / SAMPLES_FILE
    if not path.is_file():
        raise fail(f"--baseline {directory}: {SAMPLES_FILE} not found; point it at the output_dir of an earlier eval")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def compare(rows: list[dict[str, Any]], baseline: list[dict[str, Any]], seed: int) -> dict[str, dict[str, float]]:
    """Paired differences (this eval minus the baseline, prompt by prompt) of every shared number."""
    if [r["prompt"] for r in rows] != [r["prompt"] for r in baseline]:
        raise fail(f"--baseline: its {len(baseline)} prompts differ from these {len(rows)}; evaluate both policies "
                   "with the same dataset, max_samples and seed")
    mine, theirs = _columns(rows), _columns(baseline)
    return {name: summarize([a - b for a, b in zip(mine[name], theirs[name])], seed)
            for name in mine if name in theirs}


def format_summary(summary: dict[str, dict[str, float]], title: str) -> str:
    """A fixed-width table: name, mean, std, 95% CI."""
    lines = [title, f"{'':<22}{'mean':>10}{'std':>10}   95% CI"]
    for name, s in summary.items():
        lines.append(f"{name:<22}{s['mean']:>10.4g}{s['std']:>10.4g}   [{s['ci_low']:.4g}, {s['ci_high']:.4g}]")
    return "\n".join(lines)


def run_eval(config: Config, baseline: str | None = None) -> dict[str, Any]:
    """Steps 1-7 of the module docstring; returns what eval_results.json holds."""
    # 1. check
    check_eval_config(config)
    check_one_process("eval")
    output_dir = check_output_dir(config)
    with OutputLock(output_dir):  # another run's files cannot appear between the check and the save
        _check_no_results(config, output_dir)
        return _evaluate(config, baseline, output_dir)


def _evaluate(config: Config, baseline: str | None, output_dir: Path) -> dict[str, Any]:
    """Steps 2-7, under output_dir's lock."""
    resolve_config_paths(config)  # hub ids -> local snapshot folders
    m, t = config.model, config.training
    adapters = split_paths(m.adapter_name_or_path)
    baseline_rows = read_eval_samples(baseline) if baseline else None
    # 2. prompts and 3. models
    device = inference_device(m.device)
    apply_device_defaults(config, device.type)
    model, tokenizer = load_for_inference(m, adapters, device)
    template = template_for(config.data, tokenizer)
    items = _load_prompts(config, tokenizer, template)
    holder = PPOModels(policy=model, value_head=None, reference=None, reference_adapter="")
    dtype = next(model.parameters()).dtype
    sources = [(build_reward_source(spec, config, holder, tokenizer, dtype, device, shared_base_ok=False), spec.weight)
               for spec in reward_specs(config)]
    # 4. sample and 5. score
    seed_everything(t.seed)
    rows = sample_and_score(model, tokenizer, template, items, sources, config)
    # 6. summarise
    summary = {name: summarize(values, t.seed) for name, values in _columns(rows).items()}
    name = m.model_name_or_path + (f" + {', '.join(adapters)}" if adapters else "")
    results: dict[str, Any] = {
        "model": m.model_name_or_path, "adapters": adapters, "dataset": config.data.dataset, "prompts": len(rows),
        "seed": t.seed, "weights": {source.name: weight for source, weight in sources},
        "generation": dataclasses.asdict(config.generation), "summary": summary,
    }
    print(format_summary(summary, f"eval of {name} on {len(rows)} prompts of {config.data.dataset}"), flush=True)
    if baseline_rows is not None:
        results["baseline"] = str(baseline)
        results["difference"] = compare(rows, baseline_rows, t.seed)
        print(format_summary(results["difference"], f"difference to {baseline} (this minus baseline, paired)"),
              flush=True)
    # 7. save
    output_dir.mkdir(parents=True, exist_ok=True)  # the lock made it, where locking is available
    (output_dir / SAMPLES_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    logger.info("eval results written to %s", output_dir / RESULTS_FILE)
    return results
