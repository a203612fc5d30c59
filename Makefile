# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-all bench-kernels clean

# torch first from its pinned CPU wheel, then the package with its dev extras (triton, openai, fastapi, ...).
install:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"

# Train the default tiny-code model on this Python's stdlib sources (minutes on a 2-core CPU), then sample from it.
demo: install
	$(PYTHON) -m ringlinear train --out $(DEMO_DIR) --overwrite
	$(PYTHON) -m ringlinear generate --model $(DEMO_DIR)/final --prompt "def " --max-new-tokens 96

test: install
	$(PYTHON) -m pytest -q tests

test-all: install
	RINGLINEAR_SLOW=1 $(PYTHON) -m pytest -q tests

clean:
	rm -rf runs build *.egg-info .pytest_cache
