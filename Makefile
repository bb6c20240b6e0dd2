VENV ?= .venv
DATA_DIR ?= ../shared/data
PY := $(VENV)/bin/python
# Local corpora when the folder exists; otherwise the corpora resolve on the Hugging Face hub.
ifneq ($(wildcard $(DATA_DIR)),)
export GLU_DATA_DIR := $(abspath $(DATA_DIR))
endif
OUT ?= out/demo

.PHONY: setup test test-fast demo lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup-env.sh
	scripts/setup-env.sh $(VENV)
	touch $@

# -rs and tests/skip_policy.py: every skip named, with its reason; under CI=1 an unexpected skip fails the run.
test: setup
	$(PY) -m pytest -q -rs

test-fast: setup
	$(PY) -m pytest -q -rs -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

# The default cross-domain grid on the embedded SmolLM2-135M: calibrate on each corpus, prune 20% and 40%,
# evaluate every model on every corpus. Resumable: run it again to finish an interrupted grid.
demo: setup
	$(VENV)/bin/glu-prune compare --out $(OUT)
