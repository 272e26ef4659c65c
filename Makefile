# pysparsecl: `make install` then `make test` on a fresh machine.
PYTHON ?= python3
BENCH_ARGS ?=

.PHONY: install test bench bench-quick bench-deps bench-readme tune lint info clean

install:  ## editable install with the test extra, plus a working OpenCL CPU device
	$(PYTHON) -m pip install -e '.[test]'
	PYTHON=$(PYTHON) bash scripts/ensure_opencl_cpu.sh

test:  ## the test suite, on every working OpenCL device
	$(PYTHON) -m pytest -q

bench-deps:  ## baselines (torch) and plotting (matplotlib); the benchmark skips what is missing
	-$(PYTHON) -m pip install -q -e '.[bench]'

bench: bench-deps  ## full benchmark: table, bench/results/<device>.{json,md,png}
	$(PYTHON) bench/run.py $(BENCH_ARGS)

bench-quick: bench-deps  ## smoke benchmark, under 2 minutes on a 2-core CPU
	$(PYTHON) bench/run.py --quick $(BENCH_ARGS)

bench-readme:  ## rewrite README's headline tables from the committed bench/results
	$(PYTHON) bench/run.py --readme

tune:  ## placeholder until the autotuner lands; says so
	$(PYTHON) -m pysparsecl tune

lint:
	$(PYTHON) -m ruff --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q ruff
	$(PYTHON) -m ruff check pysparsecl tests bench

info:
	$(PYTHON) -m pysparsecl info

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
