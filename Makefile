# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO_DIR ?= runs/demo
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install install-torch demo rl-demo test test-all bench-kernels clean

# torch first. An installed torch >= 2.11 (a CUDA build on a GPU machine, say) is kept. Otherwise the CPU build,
# asked for by its local version label `+cpu`: plain `torch==X` would take PyPI's default, a CUDA build of several
# GB. A CPU wheel pip can already see (its find-links or extra index, as on machines that carry one offline) is
# tried first; then PyTorch's CPU index.
install-torch:
	@if $(PYTHON) -c "import sys, torch; v = torch.__version__.split('+')[0].split('.'); \
	    sys.exit(not (int(v[0]), int(v[1])) >= (2, 11))" 2>/dev/null; then \
	  echo "torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') is installed: kept"; \
	else \
	  $(PIP) install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
	  $(PIP) install -q "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX); \
	fi

# Then the package with its dev extras (triton, openai, fastapi, ...); torch is already satisfied.
install: install-torch
	$(PIP) install -q -e ".[dev]"

# Train the default tiny-code model on this Python's stdlib sources (minutes on a 2-core CPU), then sample from it.
demo: install
	$(PYTHON) -m ringlinear train --out $(DEMO_DIR) --overwrite
	$(PYTHON) -m ringlinear generate --model $(DEMO_DIR)/final --prompt "def " --max-new-tokens 96

# RL on CPU (docs/rl.md): the demo model, a 100-step SFT on the arithmetic format, then 60 GRPO steps whose reward
# rises. Reuses $(DEMO_DIR)/final when it exists.
RL_DIR ?= runs/rl-demo
rl-demo: install
	test -f $(DEMO_DIR)/final/config.json || $(PYTHON) -m ringlinear train --out $(DEMO_DIR) --overwrite
	$(PYTHON) -c "from ringlinear.rl.tasks.arithmetic import write_sft; write_sft('$(RL_DIR)/sft.jsonl', n=4000)"
	$(PYTHON) -m ringlinear train --init-from $(DEMO_DIR)/final --data $(RL_DIR)/sft.jsonl --out $(RL_DIR)/sft \
		--steps 100 --schedule constant --lr 1e-3 --warmup-steps 10 --seq-len 128 --batch-size 8 --eval-every 0 \
		--save-every 0 --threads 1 --overwrite
	$(PYTHON) -m ringlinear rl --model $(RL_DIR)/sft/final --task arithmetic --out $(RL_DIR)/rl --steps 60 \
		--prompts-per-step 32 --group-size 8 --max-new-tokens 6 --lr 1e-4 --warmup-steps 5 --threads 1 --overwrite

test: install
	$(PYTHON) -m pytest -q tests

test-all: install
	RINGLINEAR_SLOW=1 $(PYTHON) -m pytest -q tests

clean:
	rm -rf runs build *.egg-info .pytest_cache
