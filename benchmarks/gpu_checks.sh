#!/usr/bin/env bash
# The checks that need a lent GPU, in one call from the repo root (about 8 minutes on an H200; carry .whl so that
# pytest can be installed; benchmarks/bfcl_sft_wheels.txt says how to fetch it):
#
#   OUT=$OUT bash benchmarks/gpu_checks.sh
#
# 1. the CUDA-graph decode (Engine(cuda_graphs=True)) and the gathered experts against the eager step, fp32 and bf16
# 2. decode tokens/s against transformers' generate: eager engine, CUDA graphs (benchmarks/decode_throughput.py)
# 3. training tokens/s against transformers, then a profile of 3 steps of each (benchmarks/train_throughput.py);
#    then the same with openk2 compiled (train.compile), and with both compiled
# Everything printed goes to $OUT/gpu_checks.log. Record the numbers in benchmarks/RESULTS.md with the card's name.
set -uo pipefail
if [ -z "${OUT:-}" ]; then echo "error: set OUT to the folder whose files come back" >&2; exit 2; fi
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
if ! "$PY" -c 'import pytest' 2>/dev/null; then
  if ls .whl/pytest-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl
    export PYTHONPATH="src:$SITE"
  else
    echo "warning: no pytest and no .whl/pytest-*.whl: step 1 is skipped" >&2
  fi
fi
{
  nvidia-smi -L
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  if "$PY" -c 'import pytest' 2>/dev/null; then
    timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/serve/test_engine.py -k "cuda_graph or gathered or padded or cuda_paths" \
      tests/model/test_experts.py
  fi
  timeout 240 "$PY" benchmarks/decode_throughput.py --device cuda --batches 1,16 --rounds 3 --no-compile
  timeout 180 "$PY" benchmarks/train_throughput.py --device cuda --steps 20 --profile 3
  timeout 240 "$PY" benchmarks/train_throughput.py --device cuda --steps 20 --compile openk2
  timeout 240 "$PY" benchmarks/train_throughput.py --device cuda --steps 20 --compile both
} 2>&1 | grep -v "Loading weights" | tee "$OUT/gpu_checks.log"
