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

- state what a **grouped GEMM** computes: every expert multiplies its own rows by its own weights;
- follow the **naive** pipeline (gather the rows into a padded copy, then GEMM) and SonicMoE's
  **gather-fused** one (each tile loads its rows straight from $X$ through `gather_idx`);
- count the bytes each moves through GPU memory with the cost model `io_cost`, and see which of
  the layer's GEMMs fusion saves bytes in, and how many;
- check both against a float64 oracle, including empty experts and counts that straddle the tile.

Run it with `python tutorials/03_grouped_gemm.py` (CPU, seconds).
<!-- --8<-- [end:objectives] -->
"""

# %%
# --8<-- [start:setup]
import torch

from sonic_learn.bench import measure
from sonic_learn.reference.grouped_gemm import (
    gather_fused_grouped_gemm,
    gather_fusion_savings,
    grouped_gemm_varlen_k,
    io_cost,
    naive_grouped_gemm,
)
from sonic_learn.reference.routing import build_metadata, topk_routing

torch.set_printoptions(precision=3, sci_mode=False, linewidth=100)
gen = torch.Generator().manual_seed(0)
# --8<-- [end:setup]

# %% [markdown]
r"""
<!-- --8<-- [start:math_md] -->
## The operation

After routing, grouped row $r$ belongs to expert $e$ (rows `expert_offsets[e]` to
`expert_offsets[e+1]`) and holds token `gather_idx[r]`. The up-projection is, for every row,

$$
H[r] = X[\texttt{gather\_idx}[r]]\; W_{1,e}, \qquad X \in \mathbb{R}^{T \times d},\ W_1 \in \mathbb{R}^{E \times d \times 2n},\ H \in \mathbb{R}^{TK \times 2n}.
$$

A GEMM's shape is written $(M, K) \cdot (K, N)$, and `io_cost`'s arguments follow it: there $K$
is the GEMM's reduction dimension ($d$ here), not the number of experts per token. In the code
below, the variable `K` is the top-$K$ of the routing.
<!-- --8<-- [end:math_md] -->
"""

# %%
# --8<-- [start:problem]
T, d, N, E, K = 10, 8, 6, 4, 2  # tokens, width, output columns, experts, experts per token
x = torch.randn(T, d, generator=gen)  # (T, d)
w = torch.randn(E, d, N, generator=gen)  # (E, d, N)
meta = build_metadata(topk_routing(torch.randn(T, E, generator=gen), K))
print("rows per expert:", meta.expert_counts.tolist(), " gather_idx:", meta.gather_idx.tolist())
# --8<-- [end:problem]

# %% [markdown]
r"""
<!-- --8<-- [start:naive_md] -->
## Step 1: the naive way, gather then GEMM

A separate gather kernel copies every routed row into a new buffer, padded so each expert's block
is a whole number of tiles; the GEMM then reads that buffer back. The copy costs a write and a read
of about $TK \cdot d$ elements that the fused kernel never makes. With a tiny tile of 4 rows:
<!-- --8<-- [end:naive_md] -->
"""

# %%
# --8<-- [start:naive]
tile_m = 4
x_gathered = x[meta.gather_idx.long()]  # (TK, d): the copy the naive pipeline writes to memory
padded = [-(-f // tile_m) * tile_m for f in meta.expert_counts.tolist()]
print("gathered copy:", tuple(x_gathered.shape), " padded block sizes:", padded)
y_naive = naive_grouped_gemm(x, w, meta, tile_m=tile_m)  # (TK, N)
# --8<-- [end:naive]

# %% [markdown]
r"""
<!-- --8<-- [start:fused_md] -->
## Step 2: the gather-fused way

The kernel walks the (expert, m-tile) grid. Each tile reads its slice of `gather_idx` and loads
those rows of $X$ directly into shared memory (with `cp.async` on Hopper: a TMA descriptor cannot
express an arbitrary row gather). The last tile of an expert is *masked*, not padded. Here is one
tile by hand, then the whole reference:
<!-- --8<-- [end:fused_md] -->
"""

# %%
# --8<-- [start:fused]
e = int(torch.argmax(meta.expert_counts))  # the busiest expert
start = int(meta.expert_offsets[e])
rows = slice(start, start + min(tile_m, int(meta.expert_counts[e])))  # its first tile
a_tile = x[meta.gather_idx[rows].long()]  # (<= tile_m, d), loaded straight from x
print(f"expert {e}, first tile: tokens {meta.gather_idx[rows].tolist()}")
y_fused = gather_fused_grouped_gemm(x, w, meta, tile_m=tile_m)  # (TK, N)
assert torch.allclose(y_fused[rows], a_tile @ w[e], atol=1e-5)
# --8<-- [end:fused]

# %% [markdown]
r"""
<!-- --8<-- [start:check_md] -->
## Step 3: check against a float64 oracle

The oracle is the definition, per expert, in float64. We also test the counts a tiled kernel gets
wrong most easily: an empty expert and counts of $M_\text{tile} - 1$, $M_\text{tile}$ and
$M_\text{tile} + 1$.
<!-- --8<-- [end:check_md] -->
"""

# %%
# --8<-- [start:check]
def oracle(x, w, meta):
    out = torch.empty(meta.num_rows, w.shape[2], dtype=torch.float64)
    off = meta.expert_offsets.tolist()
    for e in range(w.shape[0]):
        out[off[e] : off[e + 1]] = x.double()[meta.gather_idx[off[e] : off[e + 1]].long()] @ w[e].double()
    return out


from sonic_learn.reference.routing import Routing  # noqa: E402  (a hand-made routing)

counts = [0, tile_m - 1, tile_m, tile_m + 1]  # expert 0 gets nothing
# each expert takes c distinct tokens (a token picks an expert at most once); pairs sorted by token
pairs = sorted((t, e) for e, c in enumerate(counts) for t in torch.randperm(T, generator=gen)[:c].tolist())
token_idx = torch.tensor([t for t, _ in pairs], dtype=torch.int32)
expert_idx = torch.tensor([e for _, e in pairs], dtype=torch.int32)
edge = build_metadata(Routing(token_idx, expert_idx, torch.ones(len(pairs)), T, E))
for m in (meta, edge):
    ref = oracle(x, w, m)
    for name, fn in [("naive", naive_grouped_gemm), ("gather-fused", gather_fused_grouped_gemm)]:
        err = (fn(x, w, m, tile_m=tile_m).double() - ref).abs().max().item()
        assert err < 1e-4, (name, err)
    print("counts", m.expert_counts.tolist(), "-> both agree with the float64 oracle")
# --8<-- [end:check]

# %% [markdown]
r"""
<!-- --8<-- [start:io_md] -->
## Step 4: count the bytes

`io_cost` is a first-order model of the memory traffic (see its docstring for the assumptions).
For $M$ routed rows padded to $M_\text{pad}$, reduction width $K$ (the GEMM's, not the top-k
$K$), output width $N$ and $b$ bytes per element, the fused kernel saves $M_\text{pad} K b$ bytes
of reads and $M_\text{pad} K b + (M_\text{pad} - M) N b$ of writes. With $M = TK$ rows, no padding
and bf16 ($b = 2$), the gathered copy is $2TKd$ bytes (the copy the paper's IO accounting removes),
and the naive pipeline writes it once and reads it back once: **each GEMM that gathers saves
$2 \times 2TKd = 4TKd$ bytes**.

Which GEMMs gather? Of the layer's six grouped GEMMs, four load token rows through `gather_idx`:
the up-projection (gathers $X$) and, in the backward, the dH kernel's $dA' = dO\,W_2^\top$
(gathers $dO$) and the weight gradients $dW_2$ (gathers $dO$) and $dW_1$ (gathers $X$), these two
along their reduction dimension. The down-projection and
$d\tilde X = dH\,W_1^\top$ read an operand the previous GEMM already wrote in grouped order, so
fusion saves them nothing. `gather_fusion_savings` derives all six from the cost model. On the
paper's 7B configuration ($T = 24576$, $d = 1536$, $n = 256$, $E = 128$, $K = 8$) with balanced
experts:<!-- --8<-- [end:io_md] -->
"""

# %%
# --8<-- [start:io]
T7, d7, n7, E7, K7 = 24576, 1536, 256, 128, 8
balanced = [T7 * K7 // E7] * E7  # every expert gets T*K/E = 1536 rows (a multiple of 128)
for variant in ("naive", "gather_fused"):  # the up-projection, kernel by kernel
    c = io_cost(T7, d7, 2 * n7, balanced, tile_m=128, dtype_bytes=2, variant=variant)
    print(f"{variant:>12}: read {c.bytes_read / 2**20:7.0f} MiB, write {c.bytes_written / 2**20:7.0f} MiB, "
          f"kernels {[k.name for k in c.kernels]}")
copy_bytes = 2 * T7 * K7 * d7  # the gathered (TK, d) bf16 copy: 2TKd bytes
savings = gather_fusion_savings(T7, d7, n7, balanced)  # bytes saved per GEMM of the layer
for gemm, saved in savings.items():
    print(f"{gemm:>16}: saves {saved / 2**20:5.0f} MiB = {saved / copy_bytes:.0f} x the gathered copy")
assert all(savings[g] == 2 * copy_bytes for g in ("up-projection", "dH", "dW2", "dW1"))
assert savings["down-projection"] == savings["dX~"] == 0
print(f"per training step: {sum(savings.values()) / 2**20:.0f} MiB = 16TKd bytes")
# --8<-- [end:io]

# %% [markdown]
r"""
<!-- --8<-- [start:varlen_k_md] -->
## Step 5: the weight gradient gathers on the other dimension

In the backward pass $dW_{1,e} = X_e^\top\, dH_e$: the tokens are now the GEMM's *reduction*
dimension, and each expert has its own reduction length $f_e$ ("varlen-K"). The gather moves to
that dimension, and `grouped_gemm_varlen_k` shows it.
<!-- --8<-- [end:varlen_k_md] -->
"""

# %%
# --8<-- [start:varlen_k]
dH = torch.randn(meta.num_rows, N, generator=gen)  # (TK, N) in grouped row order
dW = grouped_gemm_varlen_k(x, dH, meta, gather_a=True)  # (E, d, N)
off = meta.expert_offsets.tolist()
for e in range(E):
    expect = x[meta.gather_idx[off[e] : off[e + 1]].long()].T @ dH[off[e] : off[e + 1]]
    assert torch.allclose(dW[e], expect, atol=1e-5)
print("dW shape", tuple(dW.shape), "matches X_e^T dH_e for every expert")
# --8<-- [end:varlen_k]

# %% [markdown]
r"""
<!-- --8<-- [start:measure_md] -->
## Step 6: measure on this device

The references are Python loops over tiles, so on a CPU they show that the code runs, not the
speed of the idea; the bytes in Step 4 carry the argument. On a GPU the cell below times them too.

On a Hopper GPU with CuTe-DSL installed, the GPU cell also runs the CuTe-DSL kernels, each checked
against the reference before it is timed. `measure` times the device's work (the host's time to
issue a call is hidden, as in training, where the host runs ahead), but these are small problems,
where fixed per-kernel costs (launch latency, a tile schedule for a few tiles) weigh heavily: the
[Benchmarks](../benchmarks.md) page has the measured results at realistic sizes.
<!-- --8<-- [end:measure_md] -->
"""

# %%
# --8<-- [start:measure]
Tm, dm, Nm, Em, Km = 512, 128, 128, 16, 2
xm = torch.randn(Tm, dm, generator=gen)
wm = torch.randn(Em, dm, Nm, generator=gen)
mm = build_metadata(topk_routing(torch.randn(Tm, Em, generator=gen), Km))
for name, fn in [("naive", naive_grouped_gemm), ("gather-fused", gather_fused_grouped_gemm)]:
    t = measure(lambda: fn(xm, wm, mm, tile_m=64), device="cpu", warmup=1, reps=5)
    print(f"cpu  {name:>12}: median {t.median_ms:8.3f} ms  (p20 {t.p20_ms:.3f}, p80 {t.p80_ms:.3f})")

if torch.cuda.is_available():  # GPU only: skipped on a CPU machine
    from sonic_learn.fast._cute import fast_available

    xg, wg = xm.cuda().bfloat16(), wm.cuda().bfloat16()  # bf16, as in training
    mg = build_metadata(topk_routing(torch.randn(Tm, Em, generator=gen).cuda(), Km))
    impls = [("naive", naive_grouped_gemm), ("gather-fused", gather_fused_grouped_gemm)]
    ok, why = fast_available()
    if ok:  # the CuTe-DSL kernels need a Hopper GPU
        from sonic_learn.fast import grouped_gemm as fast_gemm

        impls += [("fast naive", fast_gemm.naive_grouped_gemm), ("fast gather-fused", fast_gemm.gather_fused_grouped_gemm)]
    else:
        print("CuTe-DSL kernels not run:", why)
    ref = gather_fused_grouped_gemm(xg.float(), wg.float(), mg)  # fp32 on the same bf16 inputs
    for name, fn in impls:
        rel = ((fn(xg, wg, mg).float() - ref).abs().max() / ref.abs().max()).item()
        assert rel < 1e-2, (name, rel)  # bf16 output rounding: about 2**-8 relative
        t = measure(lambda: fn(xg, wg, mg), device="cuda")
        print(f"cuda {name:>17}: median {t.median_ms:8.3f} ms  (p20 {t.p20_ms:.3f}, p80 {t.p80_ms:.3f})")
# --8<-- [end:measure]

# %% [markdown]
r"""
<!-- --8<-- [start:exercises] -->
## Exercises

1. **Padding bytes.** Use `io_cost` with unbalanced counts (draw them from a real routing, as in
   the routing tutorial) and compare `padded_rows` with `rows`. How much of the naive variant's
   extra traffic is padding?
2. **FLOPs are not saved.** Why is `flops_padded` the same for both variants? What removes it?
3. **The down-projection.** Which arguments of `io_cost` describe the down-projection
   $Y = A W_2$? Is there a gather there?
4. **Invariance.** Shuffle the token order inside one expert's rows: which outputs change, and how?
   To build the shuffled metadata, permute `meta.pair_of_row` inside the expert's row range
   (`expert_offsets[e]` to `expert_offsets[e+1]`), recompute `gather_idx` as
   `routing.token_idx[pair_of_row]` and `row_of_pair` as its inverse, and make the new metadata
   with `dataclasses.replace(meta, pair_of_row=..., gather_idx=..., row_of_pair=...)`. Compare the
   GEMM outputs row by row, and the layer output after `sonic_learn.reference.moe.aggregate`.

Answer key: `tutorials/answers/03_grouped_gemm.py` (run it; every answer is checked by an assert).
<!-- --8<-- [end:exercises] -->
"""
