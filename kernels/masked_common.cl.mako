## Shared by the masked-product families (masked_vmm, masked_vmm_split, masked_gemm,
## masked_dx, masked_dw, and the helper kernels in masked_util.cl.mako): DSG's output-masked
## products Y = mask * (X @ W) (Liu et al., ICLR 2019), computing only the selected outputs.
##
## The weight is kept as W^T, (N, K) row-major ("wt"), so that the selected output (i, j)
## is the dot product of two contiguous rows: x[i, :] and wt[j, :].  A work-item collects
## GROUP selected outputs that share one operand row and computes their dot products
## together, loading the shared row once per vector for GROUP FMAs (dot_group).
##
## The selection comes in one of two forms (MASK): "bool", a (M, N) byte mask, whose
## output is dense (zeros written where the mask is False), or "slot", a (M, N) int map
## holding, for each selected (i, j), the position of j in row i's compact index list
## (-1 elsewhere), whose output is compact (M, n_keep).  The vmm and dx kernels read the
## compact index list ("idx") directly instead of the slot map.
##
## The CPU-shaped kernels use no local memory and no barriers (PoCL runs a work-group as a
## loop over its items); the GPU-shaped ones (masked_vmm_split, masked_gemm_tiled) use both.
<%namespace name="common" file="common.cl.mako"/>\

## uint `bits`: bit u set where bool entry m[e0 + u] of a row of N is true, u < 16 (one
## vector load for a whole 16, entry by entry at the row's end).
<%def name="bool_bits16(bits, m, e0, N)">uint ${bits} = 0;
        if (${e0} + 16 <= ${N}) {
            const uchar16 v = vload16(0, ${m} + ${e0});
% for u in range(16):
            ${bits} |= (uint)(v.s${"%x" % u} != 0) << ${u};
% endfor
        } else {
            for (int u = 0; u < ${N} - ${e0}; ++u)
                ${bits} |= (uint)(${m}[${e0} + u] != 0) << u;
        }\
</%def>\

<%def name="prelude()">
${common.vector_helpers("pscl_floatv", "float", VEC)}
// Tile parameters: declared once, in each family module (pysparsecl/families/masked_*.py).
#define PSCL_VEC ${VEC}

// Sum of the lanes of a vector, as a tree of half-width adds: lane i + lane i + width / 2,
// written lane by lane, each add as fma(a, 1.0f, b) (exactly a + b), so that no vector
// shuffle appears for Oclgrind to mishandle (common.cl.mako, 2 and 3).
inline float pscl_hsum(const pscl_floatv v)
{
% if VEC == 1:
    return v;
% else:
<%
    terms = ["v.s%x" % i for i in range(VEC)]
    level = 0
%>\
%   while len(terms) > 1:
<%
        half = len(terms) // 2
        pairs = [(terms[i], terms[i + half]) for i in range(half)]
        terms = ["h%d_%d" % (level, i) for i in range(half)]
        level += 1
%>\
%     for name, (a, b) in zip(terms, pairs):
    const float ${name} = fma(${a}, 1.0f, ${b});
%     endfor
%   endwhile
    return ${terms[0]};
% endif
}
</%def>


## G dot products of length K that share the row `fixed`: one vector load of `fixed` per
## G vector FMAs.  `gathered(q)` is the q-th partner row, `store(q, value)` writes result q.
<%def name="dot_group(G, fixed, gathered, store)">
            {
% for q in range(G):
                const __global float *g${q} = ${gathered(q)};
                pscl_floatv acc${q} = (pscl_floatv)(0.0f);
% endfor
                int k = 0;
                for (; k + PSCL_VEC <= K; k += PSCL_VEC) {
                    const pscl_floatv f = PSCL_LOAD_pscl_floatv(0, ${fixed} + k);
% for q in range(G):
                    acc${q} = fma(PSCL_LOAD_pscl_floatv(0, g${q} + k), f, acc${q});
% endfor
                }
% for q in range(G):
                float s${q} = pscl_hsum(acc${q});
% endfor
                for (; k < K; ++k) {
                    const float f = ${fixed}[k];
% for q in range(G):
                    s${q} = fma(g${q}[k], f, s${q});
% endfor
                }
% for q in range(G):
                ${store(q, "s%d" % q)};
% endfor
            }
</%def>


## Flush the g < GROUP collected outputs left at the end of a scan: binary pieces, so
## every piece runs a full-width dot_group with no padding work.
<%def name="flush_tail(fixed, gathered, store)">
    {
        int base = 0;
% for piece in [p for p in (32, 16, 8, 4, 2, 1) if p < GROUP]:
        if (g & ${piece}) {
            ${dot_group(piece, fixed, lambda q: gathered("base + %d" % q),
                        lambda q, v: store("base + %d" % q, v))}
            base += ${piece};
        }
% endfor
    }
</%def>


## acc_v += a * src[v * VEC ...] over one K chunk (KVEC vectors), whole or, at the end of a
## row, element by element (`part` = the valid length, < KVEC * VEC).
<%def name="chunk_fma(scale, src)">
            if (whole) {
% for v in range(KVEC):
                acc${v} = fma((pscl_floatv)(${scale}), PSCL_LOAD_pscl_floatv(${v}, ${src}), acc${v});
% endfor
            } else {
                for (int e = 0; e < part; ++e)
                    tail[e] = fma(${scale}, (${src})[e], tail[e]);
            }
</%def>

<%def name="chunk_begin()">
% for v in range(KVEC):
    pscl_floatv acc${v} = (pscl_floatv)(0.0f);
% endfor
    float tail[PSCL_KCHUNK];
    const int whole = k0 + PSCL_KCHUNK <= K;
    const int part = K - k0;
    if (!whole)
        for (int e = 0; e < PSCL_KCHUNK; ++e)
            tail[e] = 0.0f;
</%def>

<%def name="item_position(outer)">\
## The work-item's row (dx) or column (dw) and the start of its K chunk, by ACROSS.
% if ACROSS:
const int ${outer} = get_global_id(1);
    const int k0 = get_global_id(0) * PSCL_KCHUNK;
% else:
const int ${outer} = get_global_id(0);
    const int k0 = get_global_id(1) * PSCL_KCHUNK;
% endif
</%def>
