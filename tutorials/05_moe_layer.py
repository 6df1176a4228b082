# ---
# jupyter:
#   jupytext:
#     cell_markers: '"""'
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
r"""
<!-- --8<-- [start:objectives] -->
## Learning objectives

After this tutorial you can

- use `sonic_learn.MoE`, the whole layer as an `nn.Module`, with either routing and either
  backward;
- follow **one token** through the forward pass: its logits, its $K$ experts and scores, the
  grouped rows that hold it, $H$, $A$, $Y$, and the weighted sum that becomes its output;
- follow the same token back: the score gradients $dS = \langle dA', A\rangle$, the router's
  gradient, and the pieces that add up to $dX_t$;
- check the layer against the plain per-expert loop, and time it on this device.

Run it with `python tutorials/05_moe_layer.py` (CPU, seconds).
<!-- --8<-- [end:objectives] -->
"""

# %%
# --8<-- [start:setup]
import torch

import sonic_learn
from sonic_learn.bench import measure
from sonic_learn.reference.moe import naive_moe_forward, swiglu, swiglu_backward
from sonic_learn.reference.routing import build_metadata, topk_routing
from sonic_learn.reference.topk import softmax_topk

torch.set_printoptions(precision=4, sci_mode=False, linewidth=100)
torch.manual_seed(0)  # the layer's initialization
T, d, n, E, K = 8, 16, 8, 4, 2
layer = sonic_learn.MoE(d_model=d, d_expert=n, num_experts=E, top_k=K, backward="reduced_memory",
                        dtype=torch.float64)
x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)  # (T, d)
out = layer(x)  # (T, d)
print(layer)
# --8<-- [end:setup]

# %% [markdown]
r"""
<!-- --8<-- [start:forward_md] -->
## Forward: one token's journey

We follow token $t = 3$. The router scores it against the $E$ experts, top-k keeps $K$ of them,
and softmax over those $K$ logits gives the weights $S_{t,e}$:
<!-- --8<-- [end:forward_md] -->
"""

# %%
# --8<-- [start:forward_router]
t = 3
logits = x.detach() @ layer.router_w.detach()  # (T, E)
scores, experts = softmax_topk(logits, K)  # (T, K), (T, K)
print(f"token {t}: logits {logits[t].tolist()}")
print(f"token {t}: experts {experts[t].tolist()} with scores {scores[t].tolist()}")
# --8<-- [end:forward_router]

# %% [markdown]
r"""
<!-- --8<-- [start:forward_rows_md] -->
The routing metadata places the token's $K$ pairs (pair $p = tK + j$) in grouped rows
`row_of_pair[p]`, inside the row range of each chosen expert. There the up-projection loads the
token's row of $X$ through `gather_idx`, SwiGLU gives $A$, the down-projection gives $Y$, and the
aggregation sums the $K$ rows weighted by the scores:

$$
O_t = \sum_{j=1}^{K} S_{t,e_j}\; \operatorname{SwiGLU}(x_t W_{1,e_j})\, W_{2,e_j}.
$$
<!-- --8<-- [end:forward_rows_md] -->
"""

# %%
# --8<-- [start:forward_rows]
meta = build_metadata(topk_routing(logits, K))
o_t = torch.zeros(d, dtype=torch.float64)
for j in range(K):
    p = t * K + j
    r = int(meta.row_of_pair[p])
    e = int(experts[t, j])
    assert int(meta.gather_idx[r]) == t and meta.expert_offsets[e] <= r < meta.expert_offsets[e + 1]
    h = x.detach()[t] @ layer.w1.detach()[e]  # (2n,) gate/up interleaved
    a = swiglu(h[None])[0]  # (n,)
    y = a @ layer.w2.detach()[e]  # (d,)
    o_t += scores[t, j] * y
    print(f"pair {p}: grouped row {r} of expert {e}; |H| = {h.norm():.3f}, |A| = {a.norm():.3f}, |Y| = {y.norm():.3f}")
assert torch.allclose(o_t, out[t].detach(), atol=1e-12)
print("O_t rebuilt by hand equals the layer's output row")
# --8<-- [end:forward_rows]

# %% [markdown]
r"""
<!-- --8<-- [start:backward_md] -->
## Backward: the same token, in reverse

Given $dO$, the reduced-memory backward computes for each of the token's pairs
$dA' = dO_t W_{2,e}^\top$, recomputes $A$ from $H$, and gets the score gradient
$dS_{t,e} = \langle dA', A\rangle$. The router's softmax turns $dS$ into $d\,\text{logits}_t$.
The token's input gradient collects one term per pair plus the router's term:

$$
dX_t = \sum_{j} dH_{t,e_j}\, W_{1,e_j}^\top \;+\; d\,\text{logits}_t\, W_r^\top,
\qquad dH = \operatorname{dSwiGLU}(S_{t,e}\, dA',\ H).
$$
<!-- --8<-- [end:backward_md] -->
"""

# %%
# --8<-- [start:backward]
dO = torch.randn(T, d, dtype=torch.float64)  # (T, d)
out.backward(dO)

dx_t = torch.zeros(d, dtype=torch.float64)
dS = torch.zeros(K, dtype=torch.float64)
for j in range(K):
    e = int(experts[t, j])
    h = (x.detach()[t] @ layer.w1.detach()[e])[None]  # (1, 2n), what the forward cached
    a = swiglu(h)  # (1, n), recomputed
    dA_prime = dO[t][None] @ layer.w2.detach()[e].T  # (1, n)
    dS[j] = (dA_prime * a).sum()  # <dA', A>
    dH = swiglu_backward(h, scores[t, j] * dA_prime)  # (1, 2n)
    dx_t += (dH @ layer.w1.detach()[e].T)[0]  # (d,)

# The router: scores = softmax over the K chosen logits, so autograd of that small function
# turns dS into d logits (only the chosen columns get a gradient).
lg = logits[t].clone().requires_grad_(True)  # (E,)
s, _ = softmax_topk(lg[None], K)
s.backward(dS[None])
dx_t += lg.grad @ layer.router_w.detach().T  # (d,)
print(f"dS of token {t}: {dS.tolist()}")
print(f"d logits of token {t}: {lg.grad.tolist()}")
assert torch.allclose(dx_t, x.grad[t], atol=1e-12)
print("dX_t rebuilt by hand equals autograd's x.grad row")
# --8<-- [end:backward]

# %% [markdown]
r"""
<!-- --8<-- [start:check_md] -->
## Check the whole layer

Against the oracle, a per-expert loop differentiated by plain autograd, for both backward modes
and both routings:
<!-- --8<-- [end:check_md] -->
"""

# %%
# --8<-- [start:check]
for routing in ("topk", "token_rounding"):
    x_ref = x.detach().clone().requires_grad_(True)
    ref = naive_moe_forward(x_ref, layer.router_w, layer.w1, layer.w2, K, routing=routing, tile_m=4)
    ref.backward(dO)
    for mode in ("standard", "reduced_memory"):
        other = sonic_learn.MoE(d, n, E, K, routing=routing, tile_m=4, backward=mode, dtype=torch.float64)
        other.load_state_dict(layer.state_dict())
        x_got = x.detach().clone().requires_grad_(True)
        got = other(x_got)
        got.backward(dO)
        assert torch.allclose(got, ref, atol=1e-12) and torch.allclose(x_got.grad, x_ref.grad, atol=1e-12)
        print(f"routing={routing:>14}, backward={mode:>14}: output and dX match the oracle")
# --8<-- [end:check]

# %% [markdown]
r"""
<!-- --8<-- [start:measure_md] -->
## Measure on this device

One training step (forward and backward) of a small layer, for each backward mode: float32 on the
CPU, bf16 in the GPU cell, which runs only with CUDA.

On a Hopper GPU with CuTe-DSL installed, the GPU cell also runs the CuTe-DSL kernels, each checked
against the reference before it is timed. These are small problems, where fixed per-call
costs (launches, host work) weigh heavily: the [Benchmarks](../benchmarks.md) page has the
measured results at realistic sizes.
<!-- --8<-- [end:measure_md] -->
"""

# %%
# --8<-- [start:measure]
def train_step(layer, x):
    layer.zero_grad(set_to_none=True)
    layer(x).sum().backward()


xs = torch.randn(128, 64)
for mode in ("standard", "reduced_memory"):
    m = sonic_learn.MoE(64, 32, 8, 2, backward=mode)
    t_ = measure(lambda: train_step(m, xs), device="cpu", warmup=1, reps=5)
    print(f"cpu  {mode:>15}: median {t_.median_ms:8.3f} ms  (p20 {t_.p20_ms:.3f}, p80 {t_.p80_ms:.3f})")

if torch.cuda.is_available():  # GPU only: skipped on a CPU machine
    from sonic_learn.fast._cute import fast_available

    xg = xs.cuda().bfloat16()  # bf16, as in training
    backends = ["reference"]
    ok, why = fast_available()
    if ok:  # the CuTe-DSL layer needs a Hopper GPU
        backends.append("fast")
    else:
        print("CuTe-DSL kernels not run:", why)
    for mode in ("standard", "reduced_memory"):
        ref = sonic_learn.MoE(64, 32, 8, 2, backward=mode, device="cuda", dtype=torch.bfloat16)
        for backend in backends:
            m = sonic_learn.MoE(64, 32, 8, 2, backward=mode, backend=backend, device="cuda", dtype=torch.bfloat16)
            m.load_state_dict(ref.state_dict())
            if backend == "fast":  # check against the reference (same bf16 logits) before timing
                with torch.no_grad():
                    expect = ref(xg).float()
                    rel = ((m(xg).float() - expect).abs().max() / expect.abs().max()).item()
                assert rel < 5e-2, (mode, rel)
            t_ = measure(lambda: train_step(m, xg), device="cuda")
            print(f"cuda {backend:>9} {mode:>15}: median {t_.median_ms:8.3f} ms  (p20 {t_.p20_ms:.3f}, p80 {t_.p80_ms:.3f})")
# --8<-- [end:measure]

# %% [markdown]
r"""
<!-- --8<-- [start:exercises] -->
## Exercises

1. **A token with more experts.** With `routing="token_rounding"` and `tile_m=4`, find a token
   that gets more than $K$ experts, and follow it through the forward pass.
2. **The router's gradient.** With `softmax_topk` scoring, which columns of `d logits` are zero?
   `sonic_learn.MoE` has no scoring argument: call `sonic_learn.reference.moe.moe_forward` with the
   layer's weights and `scoring="topk_softmax"` (see `route`) and compare.
3. **Memory of a real layer.** Use `expected_saved_bytes` to compute the activation memory of
   `sonic_learn.MoE(1536, 256, 128, 8)` on $T = 24576$ tokens in bf16, for both modes.
4. **From the HF layout.** A Hugging Face checkpoint stores $W_1$ as `[gate | up]`. Load one
   expert that way and convert it with `interleave_gate_up`; check the output does not change.

Answer key: `tutorials/answers/05_moe_layer.py` (run it; every answer is checked by an assert).
<!-- --8<-- [end:exercises] -->
"""
