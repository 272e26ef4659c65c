## A helper kernel of the search (no tile parameters): the weight in the layout the scores
## kernel reads, when the projection is the identity (exact mode).  ARGS: its parameters,
## declared in pysparsecl/ops/drs.py (PAD_TRANSPOSE_ARGS).
<%namespace name="common" file="common.cl.mako"/>\
${util_kernels()}

<%def name="util_kernels()">
// (N, d) rows -> (d, ld) with columns N..ld-1 zero: the weight in the layout the scores
// kernel reads, when the projection is the identity (exact mode).
__kernel void pscl_drs_pad_transpose(${ARGS["pscl_drs_pad_transpose"]})
{
    const int n = get_global_id(0);
    const int t = get_global_id(1);
    if (n >= ld || t >= d)
        return;
    dst[(long)t * ld + n] = n < N ? src[src_off + (long)n * ld_src + t] : 0.0f;
}
</%def>
