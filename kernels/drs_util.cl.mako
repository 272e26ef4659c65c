## A helper kernel of the search (no tile parameters): the weight in the layout the scores
## kernel reads, when the projection is the identity (exact mode).
<%namespace name="common" file="common.cl.mako"/>\
${util_kernels()}

<%def name="util_kernels()">
// (N, d) rows -> (d, ld) with columns N..ld-1 zero: the weight in the layout the scores
// kernel reads, when the projection is the identity (exact mode).
__kernel void pscl_drs_pad_transpose(__global const float *restrict src, const long src_off,
                                     __global float *restrict dst, const int N, const int d,
                                     const int ld_src, const int ld)
{
    const int n = get_global_id(0);
    const int t = get_global_id(1);
    if (n >= ld || t >= d)
        return;
    dst[(long)t * ld + n] = n < N ? src[src_off + (long)n * ld_src + t] : 0.0f;
}
</%def>
