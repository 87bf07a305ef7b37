#!/usr/bin/env bash
# The GPU check in one call: the cuda-marked tests and the whole suite with the GPU visible (8 xdist
# workers; tests needing a package the image lacks skip), then the G1/G2 PPO benchmarks (benchmarks/gpu.py).
#
#   benchmarks/run_gpu.sh [--tests-only | --bench-only] [extra arguments for gpu.py]
#
# Reads SmolLM2's tokenizer from $TOKENIZER (default benchmarks/.cache/device/smollm2-tokenizer) and
# installs any wheel in benchmarks/.cache/device/wheels that is missing (pytest on a bare device
# image). Both folders are git-ignored: copy them there, and carry `benchmarks/.cache/device` to the
# device. Results: one JSON line per workload on stdout and in $RESULTS (default $OUT/gpu.jsonl when
# $OUT is set, else benchmarks/results/gpu/<time>.jsonl), and beside it the operator tables of one
# extra profiled step of each workload in $PROFILE (default G2:full; empty for none). Sized for
# <= 6 min of benchmarks on an H200 plus ~2 min of tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE_CACHE=benchmarks/.cache/device
TOKENIZER=${TOKENIZER:-$DEVICE_CACHE/smollm2-tokenizer}
if [[ -n "${OUT:-}" ]]; then RESULTS=${RESULTS:-$OUT/gpu.jsonl}; fi
RESULTS=${RESULTS:-benchmarks/results/gpu/$(date +%Y%m%d-%H%M%S).jsonl}
mkdir -p "$(dirname "$RESULTS")"
mode=both
if [[ "${1:-}" == "--tests-only" || "${1:-}" == "--bench-only" ]]; then mode=${1#--}; shift; fi

if [[ -d $DEVICE_CACHE/wheels ]] && ! $PYTHON -c "import pytest" 2>/dev/null; then
  $PYTHON -m pip install -q --no-index --find-links "$DEVICE_CACHE/wheels" pytest
fi
$PYTHON -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'peft', peft.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

status=0
if [[ $mode != bench-only ]]; then
  PYTHONPATH=src timeout 240 $PYTHON -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider || status=$?
  PYTHONPATH=src timeout 300 $PYTHON -m pytest -q -n "${WORKERS:-8}" -p no:cacheprovider tests \
    --junitxml "$(dirname "$RESULTS")/suite.xml" || status=$?
fi
if [[ $mode != tests-only ]]; then
  PYTHONPATH=src timeout 390 $PYTHON benchmarks/gpu.py --tokenizer "$TOKENIZER" --out "$RESULTS" \
    --profile "${PROFILE-G2:full}" --profile-dir "$(dirname "$RESULTS")" "$@" || status=$?
  echo "results: $RESULTS"
fi
exit $status
