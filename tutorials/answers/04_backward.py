"""Answer key for the exercises of tutorial 4 (tutorials/04_backward.py). Run: python tutorials/answers/04_backward.py

Every answer is computed by the library and checked with an assert, so the key cannot go stale.
"""

import inspect

import torch

from sonic_learn.reference import moe as ref_moe
from sonic_learn.reference.grouped_gemm import grouped_gemm_varlen_k
from sonic_learn.reference.moe import expected_saved_bytes, moe_forward
from sonic_learn.reference.routing import build_metadata, topk_routing

gen = torch.Generator().manual_seed(0)

# ---------------------------------------------------------------------------------------------
# 1. Reduction length. <dO, Y> multiplies two rows of d elements, <dA', A> two rows of n. For the
#    7B configuration each score's reduction reads 2(d - n) = 2560 fewer elements: 512 instead of
#    3072, d/n = 6 times fewer.
# ---------------------------------------------------------------------------------------------
d7, n7 = 1536, 256
assert 2 * d7 - 2 * n7 == 2560 and (2 * d7) // (2 * n7) == 6
print(f"1. <dO, Y> reads {2 * d7} elements per score, <dA', A> {2 * n7}: {2 * (d7 - n7)} fewer, {d7 // n7}x")

# ---------------------------------------------------------------------------------------------
# 2. Where does A' go? dh_epilogue returns A' = s * A (it has A, recomputed from H, and s in hand),
#    and the dW2 GEMM consumes it: dW2[e] = A'_e^T dO_e, with dO gathered on the reduction dim.
#    Scaling A costs P*n multiplies on rows the epilogue is already writing; scaling dO instead
#    would mean P*d multiplies on rows that are only gathered on the fly from the (T, d) dO (each
#    token's row is shared by its K pairs with K different scores), i.e. a scaled (P, d) copy.
# ---------------------------------------------------------------------------------------------
backward_src = inspect.getsource(ref_moe.ReducedMemoryExperts.backward)
assert "dh_epilogue(" in backward_src and "grouped_gemm_varlen_k(dout, a_scaled" in backward_src
T, d, n, E, K = 64, 48, 16, 4, 2
x = torch.randn(T, d, generator=gen, dtype=torch.float64)
dO = torch.randn(T, d, generator=gen, dtype=torch.float64)
routing = topk_routing(torch.randn(T, E, generator=gen, dtype=torch.float64), K)
meta = build_metadata(routing)
s = routing.scores[meta.pair_of_row.long()]  # (P,) score of each grouped row
A = torch.randn(meta.num_rows, n, generator=gen, dtype=torch.float64)
scale_A = grouped_gemm_varlen_k(dO, A * s[:, None], meta, gather_a=True)  # A' route: (E, d, n)
dO_rows = dO[meta.gather_idx.long()] * s[:, None]  # the alternative: a scaled (P, d) copy of dO
scale_dO = torch.stack([dO_rows[o:o2].T @ A[o:o2] for o, o2 in zip(meta.expert_offsets[:-1].tolist(),
                                                                     meta.expert_offsets[1:].tolist())])
assert torch.allclose(scale_A, scale_dO, atol=1e-10)
print(f"2. A' = s*A feeds dW2 (same result as scaling dO); {meta.num_rows * n} multiplies instead of "
      f"{meta.num_rows * d} and no (P, d) copy")

# ---------------------------------------------------------------------------------------------
# 3. The iso-FLOP table (the paper's 120B family, T = 32768, d = 4096, nK = 8192, E = 16K), bf16.
#    The standard cache is 17.0 GiB at K = 32 and first passes 20 GiB at K = 64 (33.0 GiB); the
#    reduced-memory cache stays about 1.25 GiB.
# ---------------------------------------------------------------------------------------------
T120, d120, nK = 32768, 4096, 8192
standard = {}
for K120 in (2, 4, 8, 16, 32, 64):
    n120, E120 = nK // K120, 16 * K120
    standard[K120] = expected_saved_bytes(T120, d120, n120, E120, T120 * K120, backward="standard")["total"] / 2**30
    reduced = expected_saved_bytes(T120, d120, n120, E120, T120 * K120, backward="reduced_memory")["total"] / 2**30
    print(f"3. K = {K120:>2} (n = {n120:>4}, E = {E120:>4}): standard {standard[K120]:6.2f} GiB, reduced {reduced:.2f} GiB")
assert 17.0 < standard[32] < 17.1 and 33.0 < standard[64] < 33.1
assert min(k for k, gib in standard.items() if gib > 20) == 64

# ---------------------------------------------------------------------------------------------
# 4. gradcheck. It checks every floating-point input: x, router_w, w1, w2 (k and the routing are
#    discrete). Away from ties it passes. With two logits of a token (almost) equal, gradcheck's
#    small perturbation of x or router_w can flip which expert is chosen: the function jumps, the
#    finite difference sees that jump, and the numerical gradient disagrees with the analytic one
#    (the layer is only piecewise differentiable; top-k has no gradient across a tie).
# ---------------------------------------------------------------------------------------------
Tg, dg, ng, Eg, Kg = 4, 6, 3, 4, 2
xg = torch.randn(Tg, dg, generator=gen, dtype=torch.float64, requires_grad=True)
rw = torch.randn(dg, Eg, generator=gen, dtype=torch.float64, requires_grad=True)
w1 = torch.randn(Eg, dg, 2 * ng, generator=gen, dtype=torch.float64, requires_grad=True)
w2 = torch.randn(Eg, ng, dg, generator=gen, dtype=torch.float64, requires_grad=True)


def layer(x, router_w, w1, w2):
    return moe_forward(x, router_w, w1, w2, Kg, backward="reduced_memory")


assert torch.autograd.gradcheck(layer, (xg, rw, w1, w2))
print("4. gradcheck passes for x, router_w, w1 and w2 away from ties")
# Now put two logits of token 0 1e-9 apart, far below gradcheck's step eps = 1e-6: give its 2nd and
# 3rd expert the same router column (equal logits), then lift the 3rd by 1e-9 for token 0.
with torch.no_grad():
    order = torch.argsort(xg[0] @ rw, descending=True)  # token 0's experts, best first
    second, third = int(order[1]), int(order[2])
    rw[:, third] = rw[:, second]
    rw[0, third] += 1e-9 / xg[0, 0]  # token 0's 3rd logit now sits 1e-9 above its 2nd
ok = torch.autograd.gradcheck(layer, (xg, rw, w1, w2), raise_exception=False)
assert not ok
print("4. with two logits 1e-9 apart, gradcheck fails: the perturbation changes the chosen experts")
