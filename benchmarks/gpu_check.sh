#!/usr/bin/env bash
# The GPU check of issue #27 (benchmarks/gpu_check.py): random-weight LLaVA-1.5-7B, BLIP-2 Flan-T5-XL and Qwen2-VL-7B
# shapes built on the GPU in bfloat16; seconds per 100-step concept (cached and official-style loop), caption latency
# with and without a concept, peak GPU memory. At most 8 minutes on one H100/H200; every finished row is kept in the
# JSON even if the time limit stops it.
#
#   bash benchmarks/gpu_check.sh [OUT.json]          (default benchmarks/gpu_check.json; PYTHON=... to pick python)
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh    the same code path with tiny models on the CPU (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/gpu_check.json}"
python="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
tiny=()
if [[ "${GPU_CHECK_TINY:-0}" == "1" ]]; then
    tiny=(--tiny)
fi
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
timeout 470 "$python" benchmarks/gpu_check.py --out "$out" "${tiny[@]}"
echo "gpu_check: rows written to $out"
