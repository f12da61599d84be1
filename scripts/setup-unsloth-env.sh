#!/usr/bin/env bash
# Build a second environment for the unsloth_* family's workers (the two-environment path).
# Unsloth pins older transformers/trl/datasets than the server's engine; on a CPU machine the two do not live
# well in one environment. Usage: bash scripts/setup-unsloth-env.sh [VENV_DIR]   (default .venv-unsloth)
# Then: llm-mcp serve --unsloth-python VENV_DIR/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-unsloth}"
if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import unsloth, tensorboard, gguf" >/dev/null 2>&1; }; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    # CPU torch from local disk here; on a GPU machine install the CUDA build of torch instead.
    "$venv/bin/pip" install -q torch==2.13.0
    "$venv/bin/pip" install -q -r requirements-unsloth.txt
    # without their CUDA-only dependencies (xformers, triton, a CUDA torch): unsloth 2026.10.9 runs on CPU as is
    "$venv/bin/pip" install -q --no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9
fi
# always: this checkout's code is what the workers run
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/python" -c "import unsloth, llm_mcp.workers.worker; print('unsloth', unsloth.__version__)" 2>/dev/null
