#!/usr/bin/env bash
# The GPU run of memory_speed (issue 13's device check): full-depth Qwen3-8B-shaped random layers in bfloat16,
# 1 and 6 rows of 32k tokens, and a 32k-token prefill with the CUDA allocator's peak. From the repository root:
#   bash evaluation/benchmarks/memory_speed_gpu.sh [log file]
# On a machine whose Python lacks this project's light dependencies (fire, termcolor) and cannot fetch them, put
# their wheels in .whl/ first (pip download --no-deps --only-binary=:all: -d .whl fire termcolor); they are
# installed into a temporary folder, not into the machine's Python.
set -euo pipefail
log=${1:-${OUT:-.}/memory_speed_gpu.log}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    python3 -m evaluation.benchmarks.memory_speed --device cuda --dtype bfloat16 --layers 36 \
        --shapes 1x32768,6x32768 --prefill_tokens 32768 --skip_kvtiny --repeats 5
} 2>&1 | tee "$log"
