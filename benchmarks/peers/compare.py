"""Print every side's result for one workload and our ratios against the peers (stdlib only).

Usage: python compare.py benchmarks/results/W1   (the folder run_all.sh fills)
Writes summary.json beside the results: per side the median round, plus the ratios.

Column `rows r/s/e/u`: rows per forward pass of the rollout, score, evaluate and update phases
(`rows_per_pass` in each side's JSON; "?" where an older result lacks it), so a pair whose passes
differ shows it; `reward` is the side's reward source (lora / full model, or function).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

PAIRS = [("ours-full", "trl-full"), ("ours-lora", "llamafactory-lora")]
PHASES = ("rollout", "score", "evaluate", "update")


def rows_per_pass(result: dict) -> dict:
    """Rows per pass of each phase; from `micro_batch` / `eval_chunk` for results written before it."""
    rows = result.get("rows_per_pass")
    if rows:
        return rows
    return {"update": result.get("micro_batch"), "evaluate": result.get("eval_chunk")}


def rows_label(result: dict) -> str:
    rows = rows_per_pass(result)
    return "/".join(str(rows.get(phase) or "?") for phase in PHASES)


def median_round(rounds: list[dict]) -> dict:
    """The round whose seconds_per_update is the median (the lower middle for an even count)."""
    ordered = sorted(rounds, key=lambda r: r["seconds_per_update"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rounds_seconds_per_update"] = [r["seconds_per_update"] for r in rounds]
    chosen["rounds_peak_rss_gb"] = [r["peak_rss_gb"] for r in rounds]
    chosen["peak_rss_gb"] = statistics.median(r["peak_rss_gb"] for r in rounds)
    return chosen


def main(folder: str) -> None:
    results: dict[str, list[dict]] = {}
    for path in sorted(Path(folder).glob("*-[0-9]*.json")):
        side = path.stem.rsplit("-", 1)[0]
        results.setdefault(side, []).append(json.loads(path.read_text()))
    sides = {side: median_round(rounds) for side, rounds in results.items()}
    print(f"{'side':<20} {'s/update':>9} {'rollout':>8} {'score':>7} {'evaluate':>9} {'update':>8} "
          f"{'tok/s':>7} {'RSS GB':>7} {'rows r/s/e/u':>13} {'reward':>8}  rounds (s/update)")
    for side, r in sides.items():
        p = r["phases"]
        print(f"{side:<20} {r['seconds_per_update']:>9.2f} {p.get('rollout', 0):>8.2f} {p.get('score', 0):>7.2f} "
              f"{p.get('evaluate', 0):>9.2f} {p.get('update', 0):>8.2f} {r.get('tokens_per_second', 0):>7.0f} "
              f"{r['peak_rss_gb']:>7.2f} {rows_label(r):>13} {r.get('reward_source', '?'):>8}  "
              f"{r['rounds_seconds_per_update']}")
    ratios = {}
    for ours, peer in PAIRS:
        if ours in sides and peer in sides:
            time_ratio = sides[ours]["seconds_per_update"] / sides[peer]["seconds_per_update"]
            rss_ratio = sides[ours]["peak_rss_gb"] / sides[peer]["peak_rss_gb"]
            ours_rows, peer_rows = rows_per_pass(sides[ours]), rows_per_pass(sides[peer])
            differ = {phase: [ours_rows.get(phase), peer_rows.get(phase)] for phase in PHASES
                      if ours_rows.get(phase) != peer_rows.get(phase)}
            ratios[f"{ours}/{peer}"] = {"seconds_per_update": round(time_ratio, 3), "peak_rss": round(rss_ratio, 3),
                                        "rows_per_pass_differ": differ}
            note = "; rows per pass differ (ours, peer): " + ", ".join(
                f"{phase} {a} vs {b}" for phase, (a, b) in differ.items()) if differ else ""
            print(f"{ours} / {peer}: time x{time_ratio:.3f} ({1 / time_ratio:.2f}x faster), "
                  f"peak RSS x{rss_ratio:.3f}{note}")
    for side in ("ours-full", "ours-lora"):
        if side in sides:
            r = sides[side]
            print(f"{side}: matmul peak {r['matmul_gflops']:.0f} GFLOP/s; update {r['update_gflop']:.0f} GFLOP at "
                  f"{r['update_gflops']:.0f} GFLOP/s = {100 * r['update_fraction_of_peak']:.0f}% of peak; step needs "
                  f"{r['step_gflop']:.0f} GFLOP = {r['step_bound_seconds']:.2f} s at peak, measured "
                  f"x{r['step_over_bound']:.2f} of that")
    summary = {"sides": sides, "ratios": ratios}
    (Path(folder) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
