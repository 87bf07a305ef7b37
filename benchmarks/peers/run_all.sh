#!/usr/bin/env bash
# Run one workload on every side, one after another, and print the results and the ratios.
# Usage: benchmarks/peers/run_all.sh W1|W2 [ROUNDS]
#   ROUNDS (default 1): run the whole set of sides this many times, interleaved, and report each
#   side's median round, so that drifting load on a shared machine hits every side alike.
#   SIDES (default: all four) runs a subset, e.g. SIDES="ours-lora llamafactory-lora"; the other
#   sides' earlier results in the folder are kept and compared too.
#   THREADS (default 1): torch threads of every side. STEPS (default 3): measured steps after the
#   warm-up step, every side; STEPS=1 is a smoke run (its seconds mean nothing).
#   RESULTS (default benchmarks/results/<W>): the folder of JSON, logs and summary.json.
#
# Which rlhfkit our sides time (each JSON records it: rlhfkit_src, rlhfkit_commit):
#   OURS_SRC=/path/to/src   that source tree (put first on PYTHONPATH of our sides only);
#                           without it, a PYTHONPATH you set is passed through to our sides, and
#                           without either, this checkout's src/ is timed.
#   OURS_PYTHON=/path/to/python   the interpreter of our sides (default: this checkout's .venv).
# The peers always run without PYTHONPATH, in their own venvs. The workload folders, reward
# models included, are built once with OURS_PYTHON and this checkout's src/.
#
# Another source tree, e.g. the commit before, timed by the same benchmark scripts:
#   git worktree add --detach /tmp/rlhfkit-base HEAD~1
#   OURS_SRC=/tmp/rlhfkit-base/src SIDES="ours-full ours-lora" RESULTS=benchmarks/results/W1-base \
#     benchmarks/peers/run_all.sh W1 3
#   git worktree remove /tmp/rlhfkit-base
# The benchmark uses only configuration keys older rlhfkit versions know (ppo_update.py).
#
# Needs our venv (.venv, `make install`, or OURS_PYTHON); installs the peers' venvs on first use
# (setup.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
workload="${1:?usage: run_all.sh W1|W2 [ROUNDS]}"
rounds="${2:-1}"
ours="${OURS_PYTHON:-$repo/.venv/bin/python}"
ours_path="${OURS_SRC:-${PYTHONPATH:-$repo/src}}"
threads="${THREADS:-1}"  # see benchmarks/README.md: Threads
steps="${STEPS:-3}"
sides="${SIDES:-ours-full trl-full ours-lora llamafactory-lora}"
for side in $sides; do
  case "$side" in
    ours-full|ours-lora|trl-full|llamafactory-lora) ;;
    *) echo "unknown side $side; choose from ours-full trl-full ours-lora llamafactory-lora" >&2; exit 1 ;;
  esac
done
"$here/setup.sh" all
folder="$(env PYTHONPATH="$repo/src" "$ours" "$repo/benchmarks/workloads.py" "$workload" | tail -1)"
results="${RESULTS:-$repo/benchmarks/results/$workload}"
mkdir -p "$results"
for side in $sides; do rm -f "$results/$side"-*.json; done
rm -f "$results/summary.json"
echo "== ours: $ours with PYTHONPATH=$ours_path; results in $results" >&2
for round in $(seq 1 "$rounds"); do
  for side in $sides; do
    out="$results/$side-$round.json"
    echo "== round $round/$rounds: $side ($workload, $threads threads, $steps steps)" >&2
    case "$side" in
      ours-full) env PYTHONPATH="$ours_path" "$ours" "$repo/benchmarks/ppo_update.py" "$workload" \
                   --threads "$threads" --steps "$steps" --out "$out" ;;
      ours-lora) env PYTHONPATH="$ours_path" "$ours" "$repo/benchmarks/ppo_update.py" "$workload" --lora \
                   --threads "$threads" --steps "$steps" --out "$out" ;;
      trl-full) env -u PYTHONPATH "$here/.venv-trl/bin/python" "$here/trl_ppo.py" "$folder" \
                  --threads "$threads" --steps "$steps" --out "$out" ;;
      llamafactory-lora) env -u PYTHONPATH "$here/.venv-llamafactory/bin/python" "$here/llamafactory_ppo.py" \
                           "$folder" --threads "$threads" --steps "$steps" --out "$out" ;;
    esac > "$results/$side-$round.log" 2>&1 || { echo "$side failed; see $results/$side-$round.log" >&2; exit 1; }
  done
done
"$ours" "$here/compare.py" "$results"
