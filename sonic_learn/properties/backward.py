"""Properties of the reduced-memory MoE backward (pair 4: standard vs SonicMoE's backward).

Functions checked (the course's assignment 4; the key adapts ``sonic_learn.reference.moe``):

* ``swiglu_backward(h, dA) -> dH``: the derivative of A = up * silu(gate), gate = h[:, 0::2], up = h[:, 1::2].
* ``dh_epilogue(h, dA_prime, row_scores) -> (dH, dS, a_scaled)``: the epilogue of SonicMoE's dH kernel.
  With A = swiglu(H) recomputed from H: ``dS = <dA', A>`` per row, ``dA = s * dA'``,
  ``dH = swiglu_backward(H, dA)`` and ``A' = s * A`` (the operand of dW2).
* ``reduced_memory_backward(dout, x, w1, w2, h, scores, meta, tile_m) -> (dx, dw1, dw2, dscores)``.
* ``saved_bytes(T, d, n, E, P, *, dtype_bytes, backward) -> int``: activation bytes cached for backward.

The oracle is autograd in float64 on a plain per-pair formula, independent of any implementation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from sonic_learn.properties import BadInput, Property, expect, expect_raises, seeded
from sonic_learn.reference.routing import build_metadata, topk_routing


def swiglu64(h: torch.Tensor) -> torch.Tensor:
    """A = up * silu(gate) in float64 (gate = even columns, up = odd columns)."""
    h = h.double()
    return h[..., 1::2] * F.silu(h[..., 0::2])


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and bool(((a.double() - b.double()).abs() <= tol * (1 + b.double().abs())).all())


def _tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]


class RowsCase(NamedTuple):
    M: int  # rows (routed pairs)
    n: int  # expert intermediate dim
    dtype: torch.dtype
    seed: int


@st.composite
def rows_cases(draw) -> RowsCase:
    return RowsCase(draw(st.integers(0, 64)), draw(st.integers(1, 32)),
                    draw(st.sampled_from((torch.float64, torch.float32, torch.bfloat16))), draw(st.integers(0, 2**31 - 1)))


def _rows(case: RowsCase):
    g = seeded(case.seed)
    h = (torch.randn(case.M, 2 * case.n, generator=g, dtype=torch.float64) * 2).to(case.dtype)  # (M, 2n)
    dA = torch.randn(case.M, case.n, generator=g, dtype=torch.float64).to(case.dtype)  # (M, n)
    s = (0.05 + 0.95 * torch.rand(case.M, generator=g, dtype=torch.float64)).to(torch.float32)  # (M,) scores, never 1
    return h, dA, s


def check_swiglu_backward(fn, case: RowsCase) -> None:
    h, dA, _ = _rows(case)
    dH = fn(h, dA)
    expect(isinstance(dH, torch.Tensor) and tuple(dH.shape) == tuple(h.shape),
           f"[matches_autograd] dH must have h's shape {tuple(h.shape)} (interleaved like h)")
    expect(dH.dtype == h.dtype, f"[matches_autograd] dH must have h's dtype {h.dtype}, got {dH.dtype}")
    h64 = h.double().requires_grad_(True)
    (want,) = torch.autograd.grad(swiglu64(h64), h64, dA.double()) if case.M else (torch.zeros_like(h64),)
    if not _close(dH, want, _tol(h.dtype)):
        gate_ok = _close(dH[:, 0::2], want[:, 0::2], _tol(h.dtype))
        which = "the up columns (odd: d/d up = silu(gate) * dA)" if gate_ok else "the gate columns (even: d/d gate = dA * up * silu'(gate))"
        raise AssertionError(f"[matches_autograd] dH disagrees with autograd in {which}; "
                             "silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))")


def check_dh_epilogue(fn, case: RowsCase) -> None:
    h, dA_prime, s = _rows(case)
    out = fn(h, dA_prime, s)
    expect(isinstance(out, tuple) and len(out) == 3, "[matches_autograd] must return a tuple (dH, dS, a_scaled)")
    dH, dS, a_scaled = out
    # Oracle: L = sum_r s_r <dA'_r, A_r>, so dL/dh = dH and dL/ds = dS; A' = s * A.
    h64 = h.double().requires_grad_(True)
    s64 = s.double().requires_grad_(True)
    a64 = swiglu64(h64)
    loss = (s64[:, None] * a64 * dA_prime.double()).sum()
    want_dH, want_dS = torch.autograd.grad(loss, (h64, s64), retain_graph=True) if case.M else (torch.zeros_like(h64), torch.zeros_like(s64))
    want_a_scaled = (s64[:, None] * a64).detach()
    tol = _tol(h.dtype)
    expect(tuple(dS.shape) == (case.M,), f"[matches_autograd] dS must have shape (P,) = ({case.M},), got {tuple(dS.shape)}")
    if not _close(dS, want_dS, tol):
        hint = ""
        if case.M and _close(dS, want_dS * s.double(), tol):
            hint = ": dS came out multiplied by the score. dS = <dA', A> with the UNscaled A = swiglu(H), not <dA', A'>"
        raise AssertionError(f"[matches_autograd] dS disagrees with dL/ds for L = sum_r s_r <dA'_r, A_r>{hint}")
    if not _close(dH, want_dH, tol):
        hint = ""
        unscaled = torch.autograd.grad((a64 * dA_prime.double()).sum(), h64)[0] if case.M else want_dH
        if case.M and _close(dH, unscaled, tol):
            hint = (": dH equals swiglu_backward(H, dA') WITHOUT the score factor. The output is s * A @ W2, so "
                    "dA = s * dA' before the SwiGLU backward")
        raise AssertionError(f"[matches_autograd] dH disagrees with autograd{hint}")
    if not _close(a_scaled, want_a_scaled, tol):
        raise AssertionError("[matches_autograd] a_scaled must be A' = s * A = s * swiglu(H) (the operand of dW2)")
    expect(dH.dtype == h.dtype and a_scaled.dtype == h.dtype, f"[matches_autograd] dH and a_scaled must have h's dtype {h.dtype}")


class LayerCase(NamedTuple):
    T: int
    d: int
    n: int
    E: int
    k: int
    dtype: torch.dtype
    tile_m: int
    seed: int


@st.composite
def layer_cases(draw) -> LayerCase:
    E = draw(st.integers(1, 6))
    return LayerCase(draw(st.integers(0, 24)), draw(st.integers(1, 12)), draw(st.integers(1, 12)), E, draw(st.integers(1, E)),
                     draw(st.sampled_from((torch.float64, torch.float32))), draw(st.sampled_from((1, 4, 8))),
                     draw(st.integers(0, 2**31 - 1)))


def check_reduced_memory_backward(fn, case: LayerCase) -> None:
    """(dx, dw1, dw2, dscores) equal autograd of O_t = sum_pairs s * swiglu(x_t @ W1_e) @ W2_e in float64."""
    g = seeded(case.seed)
    T, d, n, E, k, dt = case.T, case.d, case.n, case.E, case.k, case.dtype
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w1 = torch.randn(E, d, 2 * n, generator=g, dtype=torch.float64) / d**0.5
    w2 = torch.randn(E, n, d, generator=g, dtype=torch.float64) / n**0.5
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    dout = torch.randn(T, d, generator=g, dtype=torch.float64)
    routing = topk_routing(logits, k)
    meta = build_metadata(routing)
    scores = routing.scores.detach()  # (P,) pair order

    # Oracle: autograd in float64 over the plain per-pair formula.
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2, scores)]
    xo, w1o, w2o, so = leaves
    t_idx, e_idx = routing.token_idx.long(), routing.expert_idx.long()
    h_pairs = torch.einsum("pd,pdm->pm", xo[t_idx], w1o[e_idx])  # (P, 2n)
    y_pairs = torch.einsum("pn,pnd->pd", swiglu64(h_pairs), w2o[e_idx])  # (P, d)
    out = torch.zeros(T, d, dtype=torch.float64).index_add(0, t_idx, so[:, None] * y_pairs)
    want = torch.autograd.grad(out, leaves, dout, allow_unused=True) if routing.num_pairs else [torch.zeros_like(t) for t in leaves]
    want = [torch.zeros_like(l) if w_ is None else w_ for w_, l in zip(want, leaves)]

    # The implementation gets what the forward cached: x, w1, w2, H (grouped rows), scores, meta.
    x_, w1_, w2_, dout_ = (t.to(dt) for t in (x, w1, w2, dout))
    h = torch.einsum("pd,pdm->pm", x_.double()[meta.gather_idx.long()], w1_.double()[e_idx[meta.pair_of_row.long()]]).to(dt)
    got = fn(dout_, x_, w1_, w2_, h, scores.to(torch.float32 if dt != torch.float64 else dt), meta, case.tile_m)
    expect(isinstance(got, tuple) and len(got) == 4, "[matches_autograd] must return (dx, dw1, dw2, dscores)")
    tol = _tol(dt) * (10 if dt == torch.float32 else 1)
    hints = {
        "dx": "dX = sum over the token's rows of dH @ W1_e^T (an unweighted gather-and-sum)",
        "dw1": "dW1_e = X_e^T @ dH_e with X gathered through gather_idx",
        "dw2": "dW2_e = A'_e^T @ dO_e with A' = s * A",
        "dscores": "dS = <dA', A> per row with dA' = dO[token] @ W2_e^T, returned in PAIR order (scatter through pair_of_row)",
    }
    for name, g_, w_ in zip(("dx", "dw1", "dw2", "dscores"), got, want):
        expect(isinstance(g_, torch.Tensor) and tuple(g_.shape) == tuple(w_.shape),
               f"[matches_autograd] {name} must have shape {tuple(w_.shape)}, got {tuple(getattr(g_, 'shape', ()))}")
        if not _close(g_, w_, tol):
            raise AssertionError(f"[matches_autograd] {name} disagrees with autograd: {hints[name]}")


class BytesCase(NamedTuple):
    T: int
    d: int
    n: int
    E: int
    k: int
    seed: int


def check_saved_bytes(fn, case: BytesCase) -> None:
    """The closed form equals the bytes measured with saved-tensor hooks on the reference layer (bf16)."""
    from sonic_learn.reference.moe import saved_activation_bytes

    g = seeded(case.seed)
    T, d, n, E, k, _ = case
    x = torch.randn(T, d, generator=g).bfloat16()
    router_w = torch.randn(d, E, generator=g).bfloat16()
    w1 = torch.randn(E, d, 2 * n, generator=g).bfloat16()
    w2 = torch.randn(E, n, d, generator=g).bfloat16()
    for mode in ("reduced_memory", "standard"):
        measured = saved_activation_bytes(x, router_w, w1, w2, k, backward=mode)
        got = fn(T, d, n, E, T * k, dtype_bytes=2, backward=mode)
        if got != measured:
            raise AssertionError(f"[matches_measurement] backward={mode!r}, T={T}, d={d}, n={n}, E={E}, P=T*K={T * k}: "
                                 f"the layer caches {measured} bytes (measured with saved_tensors_hooks), the formula gives {got}")


def check_saved_bytes_order(fn, case: BytesCase) -> None:
    T, d, n, E, k, _ = case
    P = T * k
    for b in (2, 4):
        red = fn(T, d, n, E, P, dtype_bytes=b, backward="reduced_memory")
        std = fn(T, d, n, E, P, dtype_bytes=b, backward="standard")
        expect(red < std if P > 0 else red <= std,
               f"[reduced_is_smaller] T={T}, d={d}, n={n}, E={E}, P={P}, {b}-byte dtype: reduced_memory ({red}) must cache "
               f"less than standard ({std}): it keeps X (T, d) instead of gathered X and Y (P, d each)")


def check_saved_bytes_rejects(fn, case) -> None:
    for bad in (BadInput("an unknown backward mode", (4, 8, 8, 2, 8), {"backward": "fast"}, match="backward"),
                BadInput("a negative T", (-1, 8, 8, 2, 8), match="T"),
                BadInput("dtype_bytes = 0", (4, 8, 8, 2, 8), {"dtype_bytes": 0}, match="dtype_bytes"),
                BadInput("dtype_bytes = 3 (no such dtype)", (4, 8, 8, 2, 8), {"dtype_bytes": 3}, match="dtype_bytes"),
                BadInput("dtype_bytes given as a float", (4, 8, 8, 2, 8), {"dtype_bytes": 2.0}, error=TypeError,
                         match="dtype_bytes")):
        expect_raises(fn, bad)


def bytes_cases():
    return st.builds(lambda E, k, *rest: BytesCase(rest[0], rest[1], rest[2], E, min(k, E), rest[3]),
                     st.integers(1, 6), st.integers(1, 6), st.integers(1, 16), st.integers(1, 16), st.integers(1, 16),
                     st.integers(0, 2**31 - 1))


def swiglu_backward_properties() -> list[Property]:
    return [Property("matches_autograd", "dH = d(up * silu(gate))/dh * dA, interleaved, in h's dtype", rows_cases(),
                     check_swiglu_backward, examples=(RowsCase(16, 8, torch.float64, 0), RowsCase(0, 3, torch.float32, 1),
                                                      RowsCase(33, 17, torch.bfloat16, 2)))]


def dh_epilogue_properties() -> list[Property]:
    return [Property("matches_autograd", "dS = <dA', A>, dH = swiglu_backward(H, s * dA'), A' = s * A (autograd oracle)",
                     rows_cases(), check_dh_epilogue,
                     examples=(RowsCase(16, 8, torch.float64, 0), RowsCase(0, 3, torch.float32, 1), RowsCase(9, 5, torch.float32, 2)))]


def reduced_memory_backward_properties() -> list[Property]:
    f64 = torch.float64
    return [Property("matches_autograd", "dx, dw1, dw2 and dscores equal autograd of the per-pair MoE formula (float64)",
                     layer_cases(), check_reduced_memory_backward, max_examples=10,
                     examples=(LayerCase(16, 8, 6, 4, 2, f64, 4, 0), LayerCase(0, 4, 4, 2, 1, f64, 4, 1),
                               LayerCase(7, 5, 3, 3, 3, torch.float32, 1, 2)))]


def saved_bytes_properties() -> list[Property]:
    return [
        Property("matches_measurement", "equals the bytes the reference layer caches (saved_tensors_hooks), both modes",
                 bytes_cases(), check_saved_bytes, max_examples=8, examples=(BytesCase(16, 8, 4, 4, 2, 0), BytesCase(5, 3, 7, 1, 1, 1))),
        Property("reduced_is_smaller", "reduced_memory caches less than standard whenever P = T*K > 0",
                 bytes_cases(), check_saved_bytes_order, examples=(BytesCase(4096, 4096, 1024, 128, 8, 0),)),
        Property("rejects_bad_input", "bad backward mode, sizes and dtype_bytes raise ValueError/TypeError naming the argument",
                 st.just(None), check_saved_bytes_rejects, max_examples=1),
    ]
