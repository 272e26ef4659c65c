# pysparsecl: `make install` then `make test` on a fresh machine.
PYTHON ?= python3
BENCH_ARGS ?=
TUNE_ARGS ?=

.PHONY: install test verify verify-readme verify-deps bench bench-quick bench-deps bench-readme tune lint info clean

# TVM is optional for users (its tests skip without it) but required in CI (CI=true).
install:  ## editable install with the test and TVM extras, plus a working OpenCL CPU device
	$(PYTHON) -m pip install -e '.[test]'
	$(PYTHON) -m pip install -e '.[test,tvm]' || { [ -z "$$CI" ] || exit 1; \
		echo "apache-tvm could not be installed: the TVM tests will be skipped"; }
	@# CI also runs the TVM frontend tests (torch.export, ONNX): torch's CPU build and onnx.
	[ -z "$$CI" ] || $(PYTHON) -m pip install 'torch==2.13.0' onnx
	PYTHON=$(PYTHON) bash scripts/ensure_opencl_cpu.sh

test:  ## the test suite, on every working OpenCL device
	$(PYTHON) -m pytest -q

verify-deps:  ## the Oclgrind simulator (Debian's oclgrind) when it is missing
	@command -v oclgrind >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; \
		else echo "install Oclgrind: sudo apt-get install oclgrind"; exit 1; fi; \
		export DEBIAN_FRONTEND=noninteractive; \
		$$SUDO apt-get install -y --no-install-recommends oclgrind \
		|| { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends oclgrind; }; }

verify: verify-deps  ## every kernel family x tile configurations under Oclgrind (memory, races, API, uninitialised values)
	$(PYTHON) scripts/verify.py

verify-readme: verify-deps  ## make verify, the verification tests, and their figures into docs/testing.md
	$(PYTHON) scripts/verify.py --readme

bench-deps:  ## baselines (torch) and plotting (matplotlib); the benchmark skips what is missing
	-$(PYTHON) -m pip install -q -e '.[bench]'

# Every suite of the driver, python -m bench (tvm where apache-tvm imports, tvm_network
# where apache-tvm and torch do);
# BENCH_ARGS goes to every suite that takes the option (python -m bench --help).
bench: bench-deps  ## full benchmark: tables, bench/results/[network-]<device>.{json,md,png}
	$(PYTHON) -m bench $(BENCH_ARGS)

bench-quick: bench-deps  ## smoke benchmark, under 2 minutes on a 2-core CPU
	$(PYTHON) -m bench conv2d elementwise masked network --quick $(BENCH_ARGS)

bench-readme:  ## rewrite the tables of README.md and docs/benchmarks.md from the committed bench/results
	$(PYTHON) -m bench --readme

tune:  ## autotune every tunable kernel family for the default device (TUNE_ARGS=...)
	$(PYTHON) -m pysparsecl tune $(TUNE_ARGS)

lint:
	$(PYTHON) -m ruff --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q ruff
	$(PYTHON) -m ruff check pysparsecl tests bench scripts

info:
	$(PYTHON) -m pysparsecl info

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
