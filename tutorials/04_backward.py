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

- list what a **standard** MoE backward caches (the gathered $X$, $H$ and $Y$) and what SonicMoE's
  **reduced-memory** backward caches ($X$, $H$ and the routing), and compute both in bytes;
- derive the identity $\langle dO_t, Y_{e,t} \rangle = \langle dA'_{e,t}, A_{e,t} \rangle$ that
  lets the score gradient skip $Y$, and check it numerically;
- verify that both backward passes give the gradients of plain autograd, in float64;
- see, from the closed forms, why the standard backward's memory grows with the expert
  granularity while SonicMoE's stays flat.

Run it with `python tutorials/04_backward.py` (CPU, seconds).
<!-- --8<-- [end:objectives] -->
"""

# %%
# --8<-- [start:setup]
import torch

from sonic_learn.bench import measure
from sonic_learn.reference.moe import (
    expected_saved_bytes,
    moe_forward,
    naive_moe_forward,
    saved_tensors,
    swiglu,
)
from sonic_learn.reference.routing import build_metadata, topk_routing

torch.set_printoptions(precision=4, sci_mode=False, linewidth=100)
gen = torch.Generator().manual_seed(0)
T, d, n, E, K = 16, 24, 8, 4, 2
x = torch.randn(T, d, generator=gen, dtype=torch.float64)  # (T, d)
router_w = torch.randn(d, E, generator=gen, dtype=torch.float64) / d**0.5  # (d, E)
w1 = torch.randn(E, d, 2 * n, generator=gen, dtype=torch.float64) / d**0.5  # (E, d, 2n), gate/up interleaved
w2 = torch.randn(E, n, d, generator=gen, dtype=torch.float64) / n**0.5  # (E, n, d)
# --8<-- [end:setup]

# %% [markdown]
r"""
<!-- --8<-- [start:math_md] -->
## The derivation

The layer output is $O_t = \sum_{e} S_{t,e}\, Y_{e,t}$ with $Y_e = A_e W_{2,e}$. The gradient of a
routing score is therefore

$$
dS_{t,e} = \langle dO_t,\ Y_{e,t} \rangle
         = \langle dO_t,\ A_{e,t} W_{2,e} \rangle
         = \langle dO_t W_{2,e}^\top,\ A_{e,t} \rangle
         = \langle dA'_{e,t},\ A_{e,t} \rangle,
\qquad dA'_e := dO_e\, W_{2,e}^\top .
$$

The first form needs $Y$, a $(TK, d)$ tensor, kept from the forward pass. The last form needs
$dA'$, which the backward computes anyway (it is $dA$ before the score is applied), and $A$, which
is recomputed from the cached $H$ in the GEMM's epilogue. So nothing of size $TK \times d$ has to
be cached: in bf16 the reduced-memory backward keeps

$$
\underbrace{2Td}_{X} + \underbrace{4TKn}_{H} \text{ bytes (plus the routing)}, \qquad
\text{the standard one } 2TKd + 4TKn + 2TKd \text{ (gathered } X\text{, } H\text{, } Y\text{)}.
$$
<!-- --8<-- [end:math_md] -->
"""

# %%
# --8<-- [start:identity]
routing = topk_routing(x @ router_w, K)
meta = build_metadata(routing)
rows = meta.gather_idx.long()  # token of each grouped row
off = meta.expert_offsets.tolist()
dO = torch.randn(T, d, generator=gen, dtype=torch.float64)  # an upstream gradient (T, d)
for e in range(E):
    r = slice(off[e], off[e + 1])
    A = swiglu(x[rows[r]] @ w1[e])  # (f_e, n)
    Y = A @ w2[e]  # (f_e, d)
    dA_prime = dO[rows[r]] @ w2[e].T  # (f_e, n)
    lhs = (dO[rows[r]] * Y).sum(1)  # <dO, Y>, a reduction over d
    rhs = (dA_prime * A).sum(1)  # <dA', A>, a reduction over n
    assert torch.allclose(lhs, rhs, atol=1e-12)
print("dS = <dO, Y> = <dA', A> for every routed pair")
# --8<-- [end:identity]

# %% [markdown]
r"""
<!-- --8<-- [start:grads_md] -->
## Step 1: both backward passes give autograd's gradients

`moe_forward(..., backward=...)` runs the layer with one of two hand-written
`torch.autograd.Function`s. The oracle is `naive_moe_forward`, a per-expert Python loop that plain
autograd differentiates. In float64 all gradients (to $x$, the router and both expert weights)
must agree to rounding error.
<!-- --8<-- [end:grads_md] -->
"""

# %%
# --8<-- [start:grads]
def grads(forward, **kw):
    params = [t.clone().requires_grad_(True) for t in (x, router_w, w1, w2)]
    out = forward(*params, K, **kw)
    out.backward(dO)
    return [p.grad for p in params]


oracle = grads(naive_moe_forward)
for mode in ("standard", "reduced_memory"):
    got = grads(moe_forward, backward=mode)
    errs = [(g - o).abs().max().item() for g, o in zip(got, oracle)]
    assert max(errs) < 1e-10, (mode, errs)
    print(f"{mode:>15}: max |grad - autograd| over x, router_w, w1, w2 = {max(errs):.1e}")
# --8<-- [end:grads]

# %% [markdown]
r"""
<!-- --8<-- [start:saved_md] -->
## Step 2: what each backward keeps

`saved_tensors` runs the forward under `torch.autograd.graph.saved_tensors_hooks` and lists every
activation the autograd Function keeps for its backward (weights excluded); `expected_saved_bytes`
is the closed form, term by term. They must agree exactly.
<!-- --8<-- [end:saved_md] -->
"""

# %%
# --8<-- [start:saved]
xf, rwf, w1f, w2f = (t.float() for t in (x, router_w, w1, w2))
for mode in ("standard", "reduced_memory"):
    found = saved_tensors(xf, rwf, w1f, w2f, K, backward=mode)
    expected = expected_saved_bytes(T, d, n, E, T * K, dtype=torch.float32, backward=mode)
    print(f"{mode}: " + ", ".join(f"{s.shape} {str(s.dtype)[6:]}" for s in found))
    print(f"   measured {sum(s.nbytes for s in found)} bytes, closed form {expected['total']} bytes")
    assert sum(s.nbytes for s in found) == expected["total"]
# --8<-- [end:saved]

# %% [markdown]
r"""
<!-- --8<-- [start:granularity_md] -->
## Step 3: memory vs expert granularity

Fine-grained MoEs keep the active expert width $nK$ fixed (so the FLOPs stay fixed) while making
experts smaller: $n$ shrinks, $K$ and $E$ grow. The closed forms on the paper's 120B family
($T = 32768$, $d = 4096$, $nK = 8192$, $E = 16K$; the paper's rows are $K = 4, 8, 16$), in bf16,
per layer:
<!-- --8<-- [end:granularity_md] -->
"""

# %%
# --8<-- [start:granularity]
T120, d120, nK = 32768, 4096, 8192
print(f"{'n':>5} {'K':>3} {'E':>4} {'standard GiB':>13} {'reduced GiB':>12}")
for K120 in (2, 4, 8, 16):
    n120, E120 = nK // K120, 16 * K120
    std = expected_saved_bytes(T120, d120, n120, E120, T120 * K120, backward="standard")["total"]
    red = expected_saved_bytes(T120, d120, n120, E120, T120 * K120, backward="reduced_memory")["total"]
    print(f"{n120:>5} {K120:>3} {E120:>4} {std / 2**30:>13.2f} {red / 2**30:>12.2f}")
# --8<-- [end:granularity]

# %% [markdown]
r"""
<!-- --8<-- [start:measure_md] -->
## Step 4: measure on this device

Forward plus backward of both modes on a small float32 problem. On a CPU both are dominated by
the references' Python loops; what matters on the GPU is the memory above, and the kernels (see
[the CuTe-DSL page](../reading-cute-dsl.md)).
<!-- --8<-- [end:measure_md] -->
"""

# %%
# --8<-- [start:measure]
def step(mode, tensors):
    params = [t.detach().requires_grad_(True) for t in tensors]
    moe_forward(*params, K, backward=mode).sum().backward()


for mode in ("standard", "reduced_memory"):
    t = measure(lambda: step(mode, (xf, rwf, w1f, w2f)), device="cpu", warmup=1, reps=5)
    print(f"cpu  {mode:>15}: median {t.median_ms:8.3f} ms  (p20 {t.p20_ms:.3f}, p80 {t.p80_ms:.3f})")

if torch.cuda.is_available():  # GPU only: skipped on a CPU machine
    on_gpu = tuple(t.cuda() for t in (xf, rwf, w1f, w2f))
    for mode in ("standard", "reduced_memory"):
        t = measure(lambda: step(mode, on_gpu), device="cuda")
        print(f"cuda {mode:>15}: median {t.median_ms:8.3f} ms  (p20 {t.p20_ms:.3f}, p80 {t.p80_ms:.3f})")
# --8<-- [end:measure]

# %% [markdown]
r"""
<!-- --8<-- [start:exercises] -->
## Exercises

1. **Reduction length.** $\langle dO, Y\rangle$ reduces over $d$, $\langle dA', A\rangle$ over
   $n$. For the 7B configuration ($d = 1536$, $n = 256$), how many fewer elements does each
   score's reduction read?
2. **Where does $A'$ go?** In `ReducedMemoryExperts.backward`, find $A' = s \odot A$ and the GEMM
   that consumes it. Why is it cheaper to scale $A$ than $dO$?
3. **The iso-FLOP table.** Extend Step 3 to $K = 32$ and $K = 64$. At which $K$ (and expert
   width $n$) does the standard backward's cache first exceed 20 GiB per layer?
4. **gradcheck.** Run `torch.autograd.gradcheck` on `moe_forward` with `backward="reduced_memory"`
   on a tiny float64 problem. Which inputs can it check? What would go wrong if two logits of a
   token were almost equal, so that gradcheck's small perturbations changed the chosen experts?

Answer key: `tutorials/answers/04_backward.py` (run it; every answer is checked by an assert).
<!-- --8<-- [end:exercises] -->
"""
