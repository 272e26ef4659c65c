## Helpers shared by every pysparsecl kernel family.  Import with
##   <%namespace name="common" file="common.cl.mako"/>
## Internal identifiers carry the PSCL_/pscl_ prefix so they cannot clash with user names.

<%def name="vector_type(scalar, width)">${scalar if width == 1 else "%s%d" % (scalar, width)}</%def>

## Component names .s0 .. .sf of an OpenCL vector (a scalar has just itself).
<%def name="component(expr, width, index)">${expr if width == 1 else "%s.s%x" % (expr, index)}</%def>

## typedef + unaligned load/store macros for a vector of `width` elements of `scalar`.
<%def name="vector_helpers(alias, scalar, width)">
typedef ${vector_type(scalar, width)} ${alias};
% if width == 1:
#define PSCL_LOAD_${alias}(i, p) ((p)[(i)])
#define PSCL_STORE_${alias}(v, i, p) ((p)[(i)] = (v))
% else:
#define PSCL_LOAD_${alias}(i, p) vload${width}((i), (p))
#define PSCL_STORE_${alias}(v, i, p) vstore${width}((v), (i), (p))
% endif
</%def>
