# Two entry points, each doing its own idempotent set-up in .venv:
#   make demo   runs `outmetric demo` on the bundled dataset
#   make test   runs the whole test suite (tests, notebooks, benchmark smoke run)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench setup clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/outmetric demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.run

clean:
	rm -rf $(VENV) outmetric-demo
