"""Kernel families, one module each: the family's tile parameters (its
:class:`~pysparsecl.params.ParamSpec`), the values derived from them, what its template
renders from and how its kernels launch.  Each family has one template,
``kernels/<family>.cl.mako`` (a GPU-shaped variant may share its CPU sibling's template).

The op modules (:mod:`pysparsecl.ops`) validate a call, let the op's routine choose the
families that run (:class:`~pysparsecl.params.Routine`), look up their parameters
(:func:`pysparsecl.tuning.lookup`), launch through these modules and deliver the result.
docs/adding-a-family.md walks through adding a family.
"""

#: Local memory every OpenCL GPU and Oclgrind provide (the OpenCL minimum for a full
#: profile device): the GPU-shaped kernels stay inside it, so they build everywhere.
#: (Each spec's ``local_memory`` also lets the tuner and lookup drop configurations
#: beyond a smaller device's limit.)
LOCAL_MEM_BYTES = 32 * 1024

#: The family modules, by family name.
NAMES = ("conv2d_csr", "conv2d_pack_rows", "conv2d_pack_flat", "elementwise", "masked_vmm",
         "masked_vmm_split", "masked_gemm", "masked_gemm_tiled", "masked_dx", "masked_dw",
         "masked_lists",
         "masked_bn", "masked_conv", "masked_conv_channels", "masked_conv_tiled", "masked_conv_dx",
         "masked_conv_dw", "masked_compact", "masked_compact_tiled", "masked_compact_dw",
         "masked_compact_dw_tiled",
         "drs_project", "drs_project_split", "drs_project_compact", "drs_conv_project_tiled",
         "drs_scores", "drs_fused",
         "drs_topk", "drs_topk_team", "training", "pooling")


def modules() -> dict:
    """Every family module, by family name."""
    import importlib
    return {name: importlib.import_module(f"{__name__}.{name}") for name in NAMES}
