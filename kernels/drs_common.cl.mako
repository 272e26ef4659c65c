## Shared by the dimension-reduction search's families (DSG, Liu et al., ICLR 2019): the
## search projects the rows of x and the columns of w to k dimensions with a sparse random
## projection (drs_project), multiplies the small projections to estimate every output
## (drs_scores, or drs_fused for a few rows), and keeps each row's n_keep largest estimates
## (drs_topk, drs_topk_team).  The scores travel as order-preserving uint keys.
<%namespace name="common" file="common.cl.mako"/>\

<%def name="key_function()">
// Order-preserving map of float to uint: a larger key is a larger float.  Negative floats
// have every bit flipped, the others only the sign bit; -0 counts as +0 (equal values
// tie) and NaN maps to 0, below every number.
inline uint pscl_key1(const float f)
{
    const uint bits = (f == 0.0f) ? 0u : as_uint(f);
    const uint key = bits ^ (as_uint(as_int(bits) >> 31) | 0x80000000u);
    return isnan(f) ? 0u : key;
}
% if VEC > 1:
inline uint${VEC} pscl_key${VEC}(const float${VEC} f)
{
    const uint${VEC} bits = as_uint${VEC}(f) & ~as_uint${VEC}(f == 0.0f);
    const uint${VEC} key = bits ^ (as_uint${VEC}(as_int${VEC}(bits) >> 31) | 0x80000000u);
    return select(key, (uint${VEC})(0u), as_uint${VEC}(isnan(f)));
}
% endif
</%def>
