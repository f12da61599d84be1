#!/usr/bin/env bash
# The GPU check, for the day a GPU is lent (one H100/H200, no network, under 10 minutes). Prepare here with
# `bash benchmarks/gpu_wheels.sh`, then through the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# It installs the carried wheels, runs benchmarks/gpu_check.py (QLoRA on CUDA through the engine: bitsandbytes
# NF4, flash-attention 2 where installed, Liger where installed; the loss must fall) and `llm-mcp bench` on the
# llama-3.2-1B-shape model (the baseline against the engine; Unsloth is too large to carry and is left out).
# Everything lands in $OUT: gpu_check.md, gpu_check.json, bench.json, benchmarks-gpu.md (the bench table as
# --record writes it) and the log. Append the tables to docs/benchmarks.md here, with this command, shortfalls
# included.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
start=$(date +%s)
timeout 240 python3 benchmarks/gpu_check.py --out "$OUT"
check=$?
echo "gpu_check.py: rc=$check after $(( $(date +%s) - start )) s"
timeout 300 python3 -m llm_mcp.cli bench --models llama-3.2-1B-shape --lengths 512 --rows 256 \
  --json "$OUT/bench.json" --record --docs "$OUT/benchmarks-gpu.md"
bench=$?
echo "bench: rc=$bench after $(( $(date +%s) - start )) s"
exit $(( check != 0 || bench != 0 ))
