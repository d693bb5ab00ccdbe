# Two entry points, each doing its own idempotent set-up in .venv:
#   make demo   runs `outmetric demo` on the bundled dataset
#   make test   runs the whole test suite (tests, notebooks, benchmark smoke run)
PYTHON ?= python3
# jaxlib's CPU factorizations call OpenBLAS, whose thread pool makes small Cholesky/QR/SVD
# 100-300x slower when it oversubscribes the cores JAX already uses; one thread is fastest.
export OPENBLAS_NUM_THREADS ?= 1
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
	$(VENV)/bin/python -m pytest -n auto --maxprocesses 4 --dist loadgroup tests

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.run

clean:
	rm -rf $(VENV) outmetric-demo
