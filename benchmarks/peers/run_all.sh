#!/usr/bin/env bash
# Run one workload on every side, one after another, and print the results and the ratios.
# Usage: benchmarks/peers/run_all.sh W1|W2 [ROUNDS]
#   ROUNDS (default 1): run the whole set of sides this many times, interleaved, and report each
#   side's median round, so that drifting load on a shared machine hits every side alike.
#   SIDES (default: all four) runs a subset, e.g. SIDES="ours-lora llamafactory-lora"; the other
#   sides' earlier results in the folder are kept and compared too.
# Needs the repo's venv (.venv, `make install`); installs the peers' venvs on first use (setup.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
workload="${1:?usage: run_all.sh W1|W2 [ROUNDS]}"
rounds="${2:-1}"
ours="$repo/.venv/bin/python"
threads="${THREADS:-1}"  # see benchmarks/README.md: Threads
"$here/setup.sh" all
folder="$("$ours" "$repo/benchmarks/workloads.py" "$workload" | tail -1)"
results="$repo/benchmarks/results/$workload"
mkdir -p "$results"
sides="${SIDES:-ours-full trl-full ours-lora llamafactory-lora}"
for side in $sides; do rm -f "$results/$side"-*.json; done
rm -f "$results/summary.json"
for round in $(seq 1 "$rounds"); do
  for side in $sides; do
    out="$results/$side-$round.json"
    echo "== round $round/$rounds: $side ($workload, $threads threads)" >&2
    case "$side" in
      ours-full) "$ours" "$repo/benchmarks/ppo_update.py" "$workload" --threads "$threads" --out "$out" ;;
      ours-lora) "$ours" "$repo/benchmarks/ppo_update.py" "$workload" --lora --threads "$threads" --out "$out" ;;
      trl-full) "$here/.venv-trl/bin/python" "$here/trl_ppo.py" "$folder" --threads "$threads" --out "$out" ;;
      llamafactory-lora) "$here/.venv-llamafactory/bin/python" "$here/llamafactory_ppo.py" "$folder" \
                           --threads "$threads" --out "$out" ;;
    esac > "$results/$side-$round.log" 2>&1 || { echo "$side failed; see $results/$side-$round.log" >&2; exit 1; }
  done
done
"$ours" "$here/compare.py" "$results"
