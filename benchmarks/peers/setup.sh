#!/usr/bin/env bash
# Create one venv per peer under benchmarks/peers/ (gitignored) with the pinned versions.
# Usage: benchmarks/peers/setup.sh [trl|llamafactory|all]   (idempotent: an existing venv is reused)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3.11}"
which="${1:-all}"

make_venv() {  # name, then pip requirements (torch first: a CPU wheel, never an unpinned one)
  local venv="$here/$1"; shift
  if [[ -x "$venv/bin/python" && -f "$venv/.ready" ]]; then return; fi
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q "$@" psutil
  touch "$venv/.ready"
}

if [[ "$which" == trl || "$which" == all ]]; then
  make_venv .venv-trl torch==2.13.0 trl==0.24.0 transformers==4.57.1 peft==0.17.1 "datasets<4.1" accelerate
fi
if [[ "$which" == llamafactory || "$which" == all ]]; then
  # LLaMA-Factory 0.9.5's PPO is written against TRL 0.9.6's PPOTrainer, while its package metadata
  # asks for trl>=0.18 (whose PPOTrainer it cannot drive): install it without dependencies, then
  # the dependencies its training path imports, with the pins its PPO works with.
  make_venv .venv-llamafactory trl==0.9.6 transformers==4.55.4 peft==0.18.1 accelerate==1.11.0 datasets==4.0.0 \
    "numpy<2" "pyarrow<21" "tyro<0.9.0" einops fire omegaconf pandas protobuf pydantic pyyaml safetensors scipy \
    sentencepiece tiktoken "torchdata>=0.10,<=0.11" matplotlib fastapi sse-starlette uvicorn
  if [[ ! -f "$here/.venv-llamafactory/.llamafactory" ]]; then
    "$here/.venv-llamafactory/bin/pip" install -q --no-deps llamafactory==0.9.5
    touch "$here/.venv-llamafactory/.llamafactory"
  fi
fi
