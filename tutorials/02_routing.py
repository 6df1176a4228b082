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

- turn router logits into token-choice top-k routing: flat (token, expert, score) triples;
- build the **routing metadata** a grouped GEMM consumes: per-expert counts $f_e$, offsets, the
  gather index, and the two permutations between pair order and expert-grouped row order;
- compute the **padding waste** of a tile-based GEMM from the counts;
- explain SonicMoE's **token rounding** (Algorithm 4): round every $f_e$ to a multiple of the tile,
  change only each expert's last tile, and check its invariants.

Run it with `python tutorials/02_routing.py` (CPU, seconds).
<!-- --8<-- [end:objectives] -->
"""

# %%
# --8<-- [start:setup]
import torch

from sonic_learn.bench import measure
from sonic_learn.reference.routing import build_metadata, round_counts, token_rounding, topk_routing

torch.set_printoptions(precision=3, sci_mode=False, linewidth=100)
gen = torch.Generator().manual_seed(0)
# --8<-- [end:setup]

# %% [markdown]
r"""
<!-- --8<-- [start:topk_md] -->
## Step 1: token-choice top-k as triples

Each of $T$ tokens picks its $K$ best experts, so there are $P = TK$ *pairs*. We store them flat,
sorted by token: pair $p$ sends token `token_idx[p]` to expert `expert_idx[p]` with weight
`scores[p]`. Expert $e$ then receives

$$
f_e = \#\{p : \texttt{expert\_idx}[p] = e\}, \qquad \sum_e f_e = P,
$$

an arbitrary number that depends on the data.
<!-- --8<-- [end:topk_md] -->
"""

# %%
# --8<-- [start:topk]
T, E, K = 6, 4, 2
logits = torch.randn(T, E, generator=gen)  # (T, E)
r = topk_routing(logits, K)
print("token_idx :", r.token_idx.tolist())
print("expert_idx:", r.expert_idx.tolist())
print("scores    :", [round(s, 3) for s in r.scores.tolist()])
print("f_e       :", torch.bincount(r.expert_idx.long(), minlength=E).tolist())
# --8<-- [end:topk]

# %% [markdown]
r"""
<!-- --8<-- [start:metadata_md] -->
## Step 2: the routing metadata

A grouped GEMM wants the pairs grouped by expert: rows `expert_offsets[e] : expert_offsets[e+1]`
belong to expert $e$. `build_metadata` computes, with a histogram, a prefix sum and a stable sort:

- `expert_counts` $f_e$ and `expert_offsets` (the exclusive prefix sum, $E+1$ entries);
- `pair_of_row[r]`: which pair sits in grouped row $r$; `row_of_pair` is its inverse;
- `gather_idx[r]`: which token row $r$ must load, the index the GEMM gathers through.
<!-- --8<-- [end:metadata_md] -->
"""

# %%
# --8<-- [start:metadata]
meta = build_metadata(r)
print("expert_counts :", meta.expert_counts.tolist())
print("expert_offsets:", meta.expert_offsets.tolist())
print("pair_of_row   :", meta.pair_of_row.tolist())
print("gather_idx    :", meta.gather_idx.tolist())
# The two permutations are inverses, and row r loads the token of the pair it holds.
P = r.num_pairs
assert torch.equal(meta.row_of_pair[meta.pair_of_row.long()], torch.arange(P, dtype=torch.int32))
assert torch.equal(meta.gather_idx, r.token_idx[meta.pair_of_row.long()])
for e in range(E):  # every grouped row of expert e really is a pair routed to e
    rows = meta.pair_of_row[meta.expert_offsets[e] : meta.expert_offsets[e + 1]].long()
    assert bool((r.expert_idx[rows] == e).all())
# --8<-- [end:metadata]

# %% [markdown]
r"""
<!-- --8<-- [start:padding_md] -->
## Step 3: what tiles cost

A Hopper GEMM computes in tiles of $M_\text{tile}$ rows (128 in SonicMoE). Expert $e$ needs
$\lceil f_e / M_\text{tile} \rceil$ tiles, and its last tile is only partly full. The rows computed
but thrown away are

$$
\text{waste} = \sum_e \Big(\Big\lceil \frac{f_e}{M_\text{tile}} \Big\rceil M_\text{tile} - f_e\Big).
$$

With many small experts (fine-grained MoE) $f_e$ is small, so this waste is a large fraction of
the work. Below: a realistic-shaped router (random logits) at $T = 4096$, $E = 64$, $K = 4$.
<!-- --8<-- [end:padding_md] -->
"""

# %%
# --8<-- [start:padding]
def padding_waste(counts: torch.Tensor, tile_m: int) -> tuple[int, int]:
    """(rows computed, rows useful) of a tile-based grouped GEMM with these expert counts."""
    padded = ((counts + tile_m - 1) // tile_m) * tile_m  # (E,)
    return int(padded.sum()), int(counts.sum())


T, E, K, tile_m = 4096, 64, 4, 128
logits = torch.randn(T, E, generator=gen)  # (T, E)
counts = build_metadata(topk_routing(logits, K)).expert_counts.long()  # (E,)
computed, useful = padding_waste(counts, tile_m)
print(f"f_e ranges over [{int(counts.min())}, {int(counts.max())}], mean {useful / E:.0f}")
print(f"rows computed {computed}, useful {useful}: {100 * (computed - useful) / computed:.1f}% of the tile work is padding")
# --8<-- [end:padding]

# %% [markdown]
r"""
<!-- --8<-- [start:rounding_md] -->
## Step 4: token rounding

SonicMoE's token rounding (paper Section 5, Algorithm 4) starts from the token-choice routing
and moves each $f_e$ to a neighbouring multiple of $M_\text{tile}$:

1. round: $\lfloor f_e \rfloor_{M}$ or $\lceil f_e \rceil_{M}$ (`mode` = `nearest`, `up`, `down`, or
   `stochastic`); `round_counts` does this step alone;
2. each expert ranks all tokens, its own token-choice picks first, then the others by score, and
   keeps the first (rounded) $f_e$ of them.

So rounding **down** drops an expert's lowest-ranked picks and rounding **up** adds the best tokens
that did not pick it. Only the last tile of each expert changes: $|f^\text{TR}_e - f_e| < M_\text{tile}$.

The reference ranks all $T$ tokens of every expert (a full sort of each column), which is simple
to read and slow on a GPU. A kernel needs much less: expert $e$ moves only
$|\delta_e| = |f^\text{TR}_e - f_e| < M_\text{tile}$ tokens, the best non-picks (up) or the worst
picks (down). So it is enough to find the $|\delta_e|$-th best candidate score, a *threshold*:
everything better is in, and among candidates exactly equal to it the reference's tie rule decides
(the lower token ranks higher). The fast path (`sonic_learn.fast.routing`) does this with two
CuTe-DSL kernels: one lays the scores out as one row per expert, the other (one thread block per
expert) finds the threshold with a radix select, four 8-bit histogram passes over the row, and
flips only those boundary pairs. No column is ever sorted.
<!-- --8<-- [end:rounding_md] -->
"""

# %%
# --8<-- [start:rounding]
print("round_counts nearest:", round_counts(torch.tensor([0, 63, 64, 65, 200]), 128, "nearest").tolist())
for mode in ("down", "nearest", "up"):
    tr = token_rounding(logits, K, tile_m=tile_m, mode=mode)
    tr_counts = build_metadata(tr).expert_counts.long()  # (E,)
    assert bool((tr_counts % tile_m == 0).all())  # every expert fills whole tiles
    assert bool(((tr_counts - counts).abs() < tile_m).all())  # only the last tile moved
    computed, useful = padding_waste(tr_counts, tile_m)
    print(f"{mode:>8}: pairs {tr.num_pairs:>6} (token choice: {T * K}), padding rows {computed - useful}")
# --8<-- [end:rounding]

# %% [markdown]
r"""
<!-- --8<-- [start:check_md] -->
## Step 5: check the invariants

Token rounding is checked against token choice itself, the natural oracle:

- `down` keeps a subset of the token-choice pairs, and `up` a superset;
- with `tile_m = 1` every count is already a multiple of the tile, so token rounding must return
  exactly the token-choice pairs (in (token, expert) order).
<!-- --8<-- [end:check_md] -->
"""

# %%
# --8<-- [start:check]
def pair_set(routing) -> set[tuple[int, int]]:
    return set(zip(routing.token_idx.tolist(), routing.expert_idx.tolist()))


tc = pair_set(topk_routing(logits, K))
assert pair_set(token_rounding(logits, K, tile_m=tile_m, mode="down")) <= tc
assert pair_set(token_rounding(logits, K, tile_m=tile_m, mode="up")) >= tc
assert pair_set(token_rounding(logits, K, tile_m=1)) == tc
print("down ⊆ token choice ⊆ up, and tile_m = 1 reproduces token choice exactly")
# --8<-- [end:check]

# %% [markdown]
r"""
<!-- --8<-- [start:measure_md] -->
## Step 6: measure on this device

Token rounding costs a little more routing work than top-k (a rank per expert); what it buys is
GEMM work. Times of the references on this device, on the first 1024 tokens (the GPU cell runs
only with CUDA):

On a Hopper GPU with CuTe-DSL installed, the GPU cell also runs the CuTe-DSL kernels, each checked
against the reference before it is timed. These are small problems, where fixed per-call
costs (launches, host work) weigh heavily: the [Benchmarks](../benchmarks.md) page has the
measured results at realistic sizes.
<!-- --8<-- [end:measure_md] -->
"""

# %%
# --8<-- [start:measure]
small = logits[:1024]  # (1024, E)
for name, fn in [("topk_routing", lambda lg: topk_routing(lg, K)),
                 ("token_rounding", lambda lg: token_rounding(lg, K, tile_m=tile_m))]:
    t = measure(lambda: fn(small), device="cpu", warmup=1, reps=5)
    print(f"cpu  {name:>14}: median {t.median_ms:8.3f} ms  (p20 {t.p20_ms:.3f}, p80 {t.p80_ms:.3f})")

if torch.cuda.is_available():  # GPU only: skipped on a CPU machine
    from sonic_learn.fast._cute import fast_available

    lg = small.cuda()
    impls = [("topk_routing", lambda lg: topk_routing(lg, K)),
             ("token_rounding", lambda lg: token_rounding(lg, K, tile_m=tile_m))]
    ok, why = fast_available()
    if ok:  # the CuTe-DSL routing needs a Hopper GPU
        from sonic_learn.fast import routing as fast_routing

        # check_finite=False skips the NaN check's device-to-host sync (the logits are finite by
        # construction; each output is checked against the reference before it is timed).
        impls += [("fast topk_routing", lambda lg: fast_routing.topk_routing(lg, K, check_finite=False)),
                  ("fast token_rounding",
                   lambda lg: fast_routing.token_rounding(lg, K, tile_m=tile_m, check_finite=False))]
    else:
        print("CuTe-DSL kernels not run:", why)
    for name, fn in impls:
        reference = topk_routing(lg, K) if "topk" in name else token_rounding(lg, K, tile_m=tile_m)
        assert pair_set(fn(lg)) == pair_set(reference), name  # check before timing
        t = measure(lambda: fn(lg), device="cuda")
        print(f"cuda {name:>19}: median {t.median_ms:8.3f} ms  (p20 {t.p20_ms:.3f}, p80 {t.p80_ms:.3f})")
# --8<-- [end:measure]

# %% [markdown]
r"""
<!-- --8<-- [start:exercises] -->
## Exercises

1. **Waste vs granularity.** Keep $TK$ fixed at 16384 and vary $E \in \{8, 32, 128\}$ with
   $K = E/8$. Plot the padding fraction of token-choice routing. Why does it grow?
2. **Stochastic rounding.** Run `round_counts(counts, 128, "stochastic", generator)` many times
   with different seeds and check that the mean of the rounded counts approaches `counts`.
3. **Exact halves.** What does `nearest` do with $f_e = 64$ and $M_\text{tile} = 128$? Find the
   sentence in `round_counts`'s docstring that says why.
4. **Scores of added tokens.** With `mode="up"`, a token can get more than $K$ experts. Find one,
   and check that its token-choice scores are unchanged.

Answer key: `tutorials/answers/02_routing.py` (run it; every answer is checked by an assert).
<!-- --8<-- [end:exercises] -->
"""
