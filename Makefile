# Two commands on a fresh machine: `make demo` (the whole pipeline) and `make test`.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | sha256sum | cut -c1-12)

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-fast serve bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e ".[test]"
	rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

demo: $(STAMP)          ## ingest -> train -> evaluate -> promote on bundled MNIST (local Ray, ephemeral Prefect, MLflow on SQLite)
	$(BIN)/condgen demo

test: $(STAMP)          ## the whole suite, slow integration tests included
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

serve: $(STAMP)
	$(BIN)/condgen serve

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf .condgen .pytest_cache
