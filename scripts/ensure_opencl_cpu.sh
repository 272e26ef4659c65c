#!/usr/bin/env bash
# Make sure a working OpenCL CPU device exists, for `make install`.
#
# PyPI's pocl-binary-distribution (PoCL 3.0, LLVM 14) cannot build kernels on recent AMD
# CPUs ("unknown target CPU 'generic'"); Debian's pocl-opencl-icd (PoCL 3.1, LLVM 15)
# works, and pyopencl's wheel finds it through /etc/OpenCL/vendors.  So: probe; if no CPU
# device can build and run a trivial kernel, install Debian's PoCL when apt is usable,
# then probe again.
set -euo pipefail
PYTHON=${PYTHON:-python3}

probe() {
    "$PYTHON" - <<'PY'
import sys
from pysparsecl import runtime
cpus = [d for d in runtime.working_devices() if runtime.device_kind(d) == "cpu"]
for d in cpus:
    print(f"OpenCL CPU device OK: {d.platform.name.strip()} / {d.name.strip()}")
sys.exit(0 if cpus else 1)
PY
}

if probe; then
    exit 0
fi

echo "No working OpenCL CPU device; installing Debian's pocl-opencl-icd."
if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        SUDO=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo"
    else
        SUDO="unusable"
    fi
    if [ "$SUDO" != "unusable" ]; then
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get install -y --no-install-recommends pocl-opencl-icd \
            || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends pocl-opencl-icd; }
        if probe; then
            exit 0
        fi
    fi
fi

cat >&2 <<'MSG'
pysparsecl: no working OpenCL CPU device, and it could not be installed automatically.
Install an OpenCL driver, for example:
  Debian/Ubuntu:  sudo apt-get install pocl-opencl-icd
  conda:          conda install -c conda-forge pocl
(PyPI's pocl-binary-distribution fails on recent AMD CPUs.)  Then check with
  python -m pysparsecl info
MSG
exit 1
