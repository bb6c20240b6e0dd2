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

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(VENV)/bin/glu-prune eval --corpus wikitext2 --seq-len 512 --max-tokens 8192
	$(VENV)/bin/glu-prune eval --corpus sms_spam --max-docs 400
