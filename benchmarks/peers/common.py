"""What the peers' drivers share: the workload folder, step timing, the JSON line.

Imported by trl_ppo.py and llamafactory_ppo.py inside the peers' own venvs, so it needs only
the standard library and torch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path


def driver_setup(description: str, lora_flag: bool = False,
                 micro_batch_flag: bool = False) -> tuple[argparse.Namespace, dict]:
    """Parse a driver's command line (WORKLOAD_FOLDER [--lora] [--micro-batch M] [--threads N]
    [--steps N] [--out FILE]), set torch's thread count, and load the workload.
    Returns (arguments, workload)."""
    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("workload", help="a workload folder written by benchmarks/workloads.py")
    if lora_flag:
        parser.add_argument("--lora", action="store_true")
    if micro_batch_flag:
        parser.add_argument("--micro-batch", type=int, help="rows per forward/backward pass of the update "
                            "(default: the whole rollout batch)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    parser.add_argument("--out", help="also write the JSON line to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args, load_workload(args.workload)


def load_workload(folder: str) -> dict:
    """The workload description written by benchmarks/workloads.py."""
    return json.loads((Path(folder) / "workload.json").read_text())


def reward_folder(work: dict, side: str) -> str:
    """The reward model folder workloads.py built for `side` (e.g. "trl-full")."""
    folder = work.get("reward_models", {}).get(side)
    if not folder or not Path(folder).is_dir():
        raise SystemExit(f"workload {work['name']} has no reward model for {side}: build it with our venv, "
                         f"`python benchmarks/workloads.py {work['name']}` (run_all.sh does)")
    return folder


def prompts(work: dict) -> list[str]:
    return [json.loads(line)["instruction"] for line in Path(work["prompts_file"]).read_text().splitlines()]


class StepClock:
    """Wall-clock time of each PPO step (the first one is the warm-up) and of named phases."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps: list[float] = []
        self.phases: dict[str, list[float]] = {}
        self.tokens: list[int] = []

    def step_done(self) -> None:
        now = time.perf_counter()
        self.steps.append(now - self.start)
        self.start = now

    def timed(self, phase: str, function):
        """`function` wrapped so that its calls add to `phase` of the current step."""
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                bucket = self.phases.setdefault(phase, [])
                while len(bucket) <= len(self.steps):
                    bucket.append(0.0)
                bucket[len(self.steps)] += time.perf_counter() - begin
        return wrapper

    def result(self, side: str, work: dict, variant: str, threads: int, steps: int, **extra) -> dict:
        measured = self.steps[1:1 + steps]
        phases = {name: round(statistics.median(values[1:1 + steps]), 3)
                  for name, values in self.phases.items() if len(values) > 1}
        out = {
            "side": side, "workload": work["name"], "variant": variant, "threads": threads,
            "steps_measured": len(measured), "seconds_per_update": round(statistics.median(measured), 3),
            "seconds_per_update_all": [round(s, 3) for s in measured], "phases": phases,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
        }
        if "rollout" in phases and self.tokens:
            out["tokens_per_second"] = round(statistics.median(self.tokens[1:1 + steps]) / phases["rollout"], 1)
        out.update(extra)
        return out


def emit(result: dict, out: str | None) -> None:
    line = json.dumps(result)
    if out:
        Path(out).write_text(line + "\n")
    print(line, flush=True)
