#!/usr/bin/env bash
# Issue 15's GPU item, three parts:
# 1. block-sparse backends: attention-only prefill vs SDPA at 32k-128k, Llama-3-8B head layout;
# 2. end to end on a random Llama-3-8B shape (4 layers, fp32): prefill, decode ms/token and memory peaks of the
#    cache and decode methods against full at 32k-128k, each cell in its own process;
# 3. tests/test_devices.py, whose CPU + CUDA split-model checks run only where CUDA is.
# Run on a CUDA machine with torch + triton installed (no network needed):
#   bash scripts/gpu-bench.sh [OUT_DIR]
# Writes OUT_DIR/attention.{md,jsonl,png}, OUT_DIR/decode/bench.{md,jsonl,csv,png}, OUT_DIR/devices.txt and
# env.txt (device, versions) for the record. The decode part's command was checked on CPU at 2k with one layer.
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
PYTHONPATH=. python -m kvtools bench --model random:llama-3-8b:layers=4,context=140000 \
  --config full,snapkv,streamingllm,recycled,retrieval-ivf --lengths 32k,64k,128k --decode-tokens 32 \
  --device cuda --out "$OUT/decode" --quiet
cat "$OUT/decode/bench.md"
PYTHONPATH=. python -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 | tail -15 | tee "$OUT/devices.txt"
