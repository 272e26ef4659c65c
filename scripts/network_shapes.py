#!/usr/bin/env python3
"""A tuner shapes file with one problem per conv2d_csr shape class of the whole-network
benchmark's ResNet-50 body (pysparsecl/testing/networks.py), at the given batches.

    python -m scripts.network_shapes --batch 1 8 [--sparsity 0.9] [--kernel 1] > shapes.json
    python -m pysparsecl tune --shapes shapes.json --budget-s 600

``--kernel 1`` keeps the 1x1 classes alone (the FC layer among them), for a run over those
only, shipped with ``python -m scripts.ship_tuning DB --merge-shapes --keep-shipped-params``.

Each class is represented by its largest convolution (most multiply-adds; of two
equal ones, the one that adds a residual), with the epilogue the network fuses into it
(bias, ReLU, residual); the FC layer is included too (the pooling layer, a depthwise
convolution, is not).
"""

from __future__ import annotations

import argparse
import json
import sys

from pysparsecl.ops.conv2d import conv2d_shape_class
from pysparsecl.testing.networks import conv_inputs, resnet50_body

#: The epilogue each convolution of a bottleneck block fuses (SparseNetwork): ReLU after
#: conv1 and conv2, the residual and ReLU after conv3, the bias alone on the projection.
_EPILOGUES = {"conv1": "bias+relu", "conv2": "bias+relu", "conv3": "bias+residual+relu",
              "proj": "bias"}


def network_shapes(batches, sparsity: float, input_hw=(56, 56), kernel=None) -> list:
    blocks = resnet50_body()
    convs, final_hw = conv_inputs(blocks, input_hw)
    best = {}
    for n in batches:
        for spec, (h, w) in convs:
            oh = (h + 2 * spec.padding - spec.kernel) // spec.stride + 1
            ow = (w + 2 * spec.padding - spec.kernel) // spec.stride + 1
            cls = conv2d_shape_class(n, spec.c_in // spec.groups, (oh, ow), spec.kernel,
                                     spec.stride)
            epilogue = _EPILOGUES[spec.name.rsplit(".", 1)[-1]]
            entry = dict(N=n, C=spec.c_in, H=h, W=w, K=spec.c_out, kernel=spec.kernel,
                         stride=spec.stride, padding=spec.padding, sparsity=sparsity,
                         epilogue=epilogue)
            weight = (spec.macs(n, (h, w)), "residual" in epilogue)  # ties: the residual's
            if cls not in best or weight > best[cls][0]:
                best[cls] = (weight, entry)
        c_last = blocks[-1].conv3.c_out   # the FC layer, a 1x1 convolution on 1x1 pixels
        fc = dict(N=n, C=c_last, H=1, W=1, K=1000, kernel=1, stride=1, padding=0,
                  sparsity=0.0, epilogue="bias")
        best[conv2d_shape_class(n, c_last, (1, 1), 1, 1)] = ((0, False), fc)
    return [entry for _, entry in best.values() if kernel is None or entry["kernel"] == kernel]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--kernel", type=int, help="only the classes of this kernel size")
    args = parser.parse_args(argv)
    json.dump({"conv2d_csr": network_shapes(args.batch, args.sparsity, kernel=args.kernel)},
              sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
