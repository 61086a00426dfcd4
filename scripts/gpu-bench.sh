#!/usr/bin/env bash
# Block-sparse backends on a GPU: attention-only prefill vs SDPA at 32k-128k, Llama-3-8B head layout.
# Run on a CUDA machine with torch + triton installed (no network needed):
#   bash scripts/gpu-bench.sh [OUT_DIR]
# Writes OUT_DIR/attention.{md,jsonl,png} plus env.txt (device, versions) for the record.
set -euo pipefail
OUT=${1:-results/prefill-attention-gpu}
mkdir -p "$OUT"
python - <<'PY' > "$OUT/env.txt"
import torch, platform
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "absent"
import transformers
print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
print(f"torch {torch.__version__}, triton {tv}, transformers {transformers.__version__}, python {platform.python_version()}")
PY
PYTHONPATH=. python -m kvtools bench-attention --config flexprefill,hip --lengths 32k,64k,128k \
  --shape llama-3-8b --backends triton,flex,torch --repeats 3 --device cuda --out "$OUT" --quiet
cat "$OUT/env.txt" "$OUT/attention.md"
