"""Count the global load instructions, by width, in the PTX that NVIDIA's OpenCL compiler
makes of the convolution kernel's batch layout: as shipped (loads through a vector-typed
pointer) and with those loads written as vloadN.  docs/design.md's claim that NVIDIA splits a
vloadN into scalar loads rests on this.

    python -m bench.ptx_loads [--device nvidia]
"""

from __future__ import annotations

import argparse
import re

import pyopencl as cl

from pysparsecl import runtime
from pysparsecl.ops.conv2d import CONV2D_CSR, template_args

KINDS = ("ld.global.nc.v4.f32", "ld.global.nc.v2.f32", "ld.global.nc.f32",
         "ld.global.v4.f32", "ld.global.v2.f32", "ld.global.f32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="nvidia")
    args = parser.parse_args()
    queue = runtime.queue_for(args.device)
    for vec in (2, 4):
        params = dict(CONV2D_CSR.defaults(), BATCH_LAYOUT=1, VEC=vec, PIX_VECS=2,
                      WG_PIX=32, WG_CH=8, CH_FASTEST=0, CBLOCK=0, PACK="flat", PACK_ITEMS=4)
        source = runtime.render("conv2d_csr.cl.mako", **template_args(params, False))
        typed = "*(const __global pscl_floatv *)("
        for name, text in (("typed pointer", source),
                           (f"vload{vec}", source.replace(typed, f"vload{vec}(0, "))):
            binary = cl.Program(queue.context, text).build().binaries[0]
            ptx = binary.decode(errors="replace")
            body = ptx[ptx.find(".entry pscl_conv2d_csr"):]
            counts = {k: len(re.findall(re.escape(k) + r"\b", body)) for k in KINDS}
            print(f"VEC={vec} {name}: " +
                  ", ".join(f"{k} x{v}" for k, v in counts.items() if v))


if __name__ == "__main__":
    main()
