#!/usr/bin/env bash
# Tests, tuning and the benchmark on an NVIDIA GPU through NVIDIA's OpenCL driver.
# Usage: OUT=results_dir [TESTS=tests|"tests/test_x.py ..."|0] [TUNE_OPS="conv2d_csr ..."]
#        [TUNE_BUDGET=120] [TUNE_ARGS="--try masked_gemm_tiled:TILE=32 ..."]
#        [MASKED_BENCH_ARGS="--no-conv --sparsity 0.5 0.9"]
#        [BENCH_BATCHES="1 8 32"|none] [DSG_BENCH=1|0] [DRS=0|1]
#        [BENCH_ARGS="--sparsity 0.9"] [NETWORK=1|0] [NETWORK_ARGS="--sparsity 0.9"]
#        [DSG_TRAINING=0|1] [DSG_TRAINING_ARGS="--sparsity 0.5 0.9"]
#        bash bench/nvidia_opencl.sh
# Run from the repository root: every benchmark goes through the driver, python -m bench.
# Tile sweeps are the tuner's job now (TUNE_OPS; python -m pysparsecl tune).
# Tuned entries land in $OUT/cache/tuning/*.json (python -m scripts.ship_tuning ships them).
# Carried wheels in .whl/ (pyopencl, pytools, platformdirs, siphash24, mako, ...) are
# installed to /tmp/site when present, for machines without pyopencl.
set -uo pipefail
OUT=${OUT:-bench/results}
TESTS=${TESTS:-tests}
TUNE_OPS=${TUNE_OPS:-}
TUNE_BUDGET=${TUNE_BUDGET:-120}
TUNE_ARGS=${TUNE_ARGS:-}
BENCH_BATCHES=${BENCH_BATCHES:-1 8 32}
DSG_BENCH=${DSG_BENCH:-1}
DRS=${DRS:-0}
BENCH_ARGS=${BENCH_ARGS:-}
NETWORK=${NETWORK:-1}
NETWORK_ARGS=${NETWORK_ARGS:-}
DSG_TRAINING=${DSG_TRAINING:-0}
DSG_TRAINING_ARGS=${DSG_TRAINING_ARGS:-}
if [ "${SWEEP_N:-0}" != 0 ] || [ "${MASKED_SWEEP:-0}" != 0 ]; then
    echo "SWEEP_N and MASKED_SWEEP are gone with bench/sweep.py and bench/masked_sweep.py:" \
        "tune instead (TUNE_OPS=... TUNE_ARGS=...)" >&2
    exit 2
fi
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site $(ls .whl/*.whl | grep -v scipy) || exit 1
    export PYTHONPATH=/tmp/site
    python3 -c "import scipy" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
        --no-compile --no-cache-dir --target /tmp/site .whl/scipy-*.whl || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The driver ships libnvidia-opencl.so.1 but no ICD file: write one and point the loader at it.
lib=$(ldconfig -p | awk '/libnvidia-opencl.so.1/{print $NF; exit}')
[ -n "$lib" ] || lib=$(find / -name 'libnvidia-opencl.so.1' -not -path '/proc/*' 2>/dev/null | head -1)
mkdir -p /tmp/ocl-vendors && echo "$lib" > /tmp/ocl-vendors/nvidia.icd
export OCL_ICD_VENDORS=/tmp/ocl-vendors
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -m pysparsecl info || exit 1
export PYSPARSECL_CACHE_DIR=$OUT/cache
if [ "$TESTS" != 0 ]; then
    echo "== tests"; python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -15
fi
if [ -n "$TUNE_OPS" ]; then
    echo "== tune"; python3 -m pysparsecl tune --device nvidia --op $TUNE_OPS \
        --budget-s "$TUNE_BUDGET" $TUNE_ARGS 2>&1 | tr '\r' '\n' | grep -v "tried, " | tail -40
fi
echo "== bench with ${PYSPARSECL_PARAMS:-shipped parameters}"
if [ "$NETWORK" = 1 ]; then
    echo "== whole network"; python3 -m bench network --device nvidia $NETWORK_ARGS \
        --out "$OUT" 2>&1 | tail -14
fi
if [ "$BENCH_BATCHES" != none ]; then
    echo "== call overhead"; python3 -m bench.profile_call --device nvidia 2>&1 | head -22
    python3 -m bench conv2d elementwise --device nvidia --batch $BENCH_BATCHES \
        --no-scipy $BENCH_ARGS --out "$OUT" 2>&1 | tail -40
fi
if [ -n "${MASKED_BENCH_ARGS:-}" ]; then   # the masked suite alone, e.g. "--no-conv"
    echo "== masked products bench"   # writes $OUT/<device>-masked.{json,md}
    python3 -m bench masked --device nvidia --tag masked $MASKED_BENCH_ARGS --out "$OUT" \
        2>&1 | tail -30
fi
if [ "$DSG_BENCH" = 1 ]; then
    echo "== DSG bench (bounded)"
    timeout 300 python3 -m bench masked --device nvidia --tag dsg --out "$OUT" \
        2>&1 | tail -20
fi
if [ "$DRS" = 1 ]; then
    echo "== DRS kernels"; python3 -m bench drs --device nvidia 2>&1 | tail -8
fi
if [ "$DSG_TRAINING" = 1 ]; then   # step times (and accuracy where scikit-learn is there)
    echo "== DSG training"; python3 -m bench dsg_training --device nvidia $DSG_TRAINING_ARGS \
        --out "$OUT" 2>&1 | tail -30
fi
