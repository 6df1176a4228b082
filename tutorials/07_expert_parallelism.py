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

- say what expert parallelism (EP) splits, and what stays replicated;
- name the six steps of an expert-parallel forward, and the collective each one uses;
- predict the all-to-all volume of one layer from $T, K, d$ and the number of ranks $W$;
- explain why token rounding interacts with EP, and what it does to the tokens-per-tile ratio;
- run the expert-parallel layer on two CPU processes and check it against the single-process layer.

Run it with `python tutorials/07_expert_parallelism.py` (CPU, a few seconds: it starts two gloo
processes).
<!-- --8<-- [end:objectives] -->
"""

# %% [markdown]
r"""
<!-- --8<-- [start:split_md] -->
## What is split, what is replicated

A layer with $E$ experts on $W$ ranks gives each rank $E_\text{local} = E / W$ experts: rank $r$
owns experts $rE_\text{local}, \dots, (r+1)E_\text{local} - 1$, their $W_1$ and $W_2$. The router
$W_r$ ($d \times E$) is small and **replicated**. Each rank also holds its own $T_r$ tokens (the
data-parallel batch). A token's $K$ experts may live anywhere, so its row of $X$ must travel:

1. **route locally** (top-k or token rounding, as on one GPU);
2. **exchange counts**: one small all-to-all of $W \times E_\text{local}$ integers;
3. **dispatch**: `all_to_all_single` with uneven splits sends each pair's row and score to its expert's rank;
4. **local experts**: the single-GPU grouped GEMMs on the received rows;
5. **combine**: the reverse all-to-all brings each weighted output row home;
6. **sum at home**: each token adds its $K$ rows.
<!-- --8<-- [end:split_md] -->
"""

# %%
# --8<-- [start:setup]
import torch

from sonic_learn.bench import measure
from sonic_learn.parallel import alltoall_bytes, launch
from sonic_learn.parallel.demo import _worker as ep_worker
from sonic_learn.reference.moe import moe_forward

torch.manual_seed(0)
T, d, n, E, K, W = 64, 32, 16, 8, 2, 2  # T tokens per rank, W ranks
print(f"{E} experts on {W} ranks: {E // W} experts per rank; router ({d} x {E}) on every rank")
# --8<-- [end:setup]

# %% [markdown]
r"""
<!-- --8<-- [start:volume_md] -->
## The all-to-all volume

Each of a rank's $T_r K$ pair rows leaves once in the dispatch and comes back once in the combine:
$2 T_r K d$ elements per layer, less the share whose expert is on the same rank ($1/W$ of the pairs
when the routing is uniform):

$$ \text{bytes out of one rank} = 2\, T_r K d \cdot \tfrac{W-1}{W} \cdot \text{bytes per element}. $$

The backward moves the same again (dO out, dX̃ back), and the reduced-memory backward sends the rows
of $X$ once more instead of caching them (see below). On the paper's 7B layer
($T_r = 24576$, $d = 1536$, $K = 8$, bf16) that is:
<!-- --8<-- [end:volume_md] -->
"""

# %%
# --8<-- [start:volume]
for world in (2, 4, 8):
    gb = alltoall_bytes(24576, 8, 1536, world, 2) / 1e9
    print(f"W={world}: {gb:.2f} GB leave each rank per forward (dispatch + combine)")
# The expert GEMMs of the same forward: 6 T K d n FLOPs (up-projection 2n wide, down-projection n).
flops = 6 * 24576 * 8 * 1536 * 256
print(f"expert forward FLOPs per rank: {flops / 1e12:.2f} TFLOP")
# --8<-- [end:volume]

# %% [markdown]
r"""
<!-- --8<-- [start:run_md] -->
## Run it: two ranks on this CPU

`sonic_learn.parallel.launch` starts $W$ processes in one gloo group (what `torchrun` does on a GPU
node, in miniature). Each rank builds the same global weights from one seed, keeps its share of the
experts, runs its tokens through `ExpertParallelMoE`, and compares with the single-process layer
applied to the same tokens with all experts. Then it times each step.
<!-- --8<-- [end:run_md] -->
"""

# %%
# --8<-- [start:run]
from argparse import Namespace

args = Namespace(tokens=T, d_model=d, d_expert=n, experts=E, top_k=K, routing="topk", tile_m=16,
                 backward="reduced_memory", chunks=1, reps=3, seed=0)
results = launch(ep_worker, W, args, timeout_s=300)
for rank, res in enumerate(results):
    print(f"rank {rank}: rel. error vs single process: out {res['err_out']:.1e}, dX {res['err_dx']:.1e}; "
          f"rows sent {res['rows_sent']}, received {res['rows_received']}")
    assert res["err_out"] < 1e-12 and res["err_dx"] < 1e-12
model_rows = alltoall_bytes(T, K, d, W, 1) // (2 * d)
print(f"cost model: {model_rows} rows leave each rank (uniform routing)")
# --8<-- [end:run]

# %% [markdown]
r"""
<!-- --8<-- [start:split_time_md] -->
## Where the time goes (CPU, gloo)

The per-step medians below come from two CPU processes talking over gloo on one machine: they show
the shape of the computation, not what NCCL over NVLink does. On GPUs, `benchmarks/expert_parallel.py`
(launched with `torchrun`) measures the same split. As a yardstick on this device, the
single-process layer on the same $W T_r$ tokens:
<!-- --8<-- [end:split_time_md] -->
"""

# %%
# --8<-- [start:split_time]
for rank, res in enumerate(results):
    print(f"rank {rank}: route {res['route'] * 1e3:.2f} ms, dispatch {res['dispatch'] * 1e3:.2f} ms, "
          f"experts {res['experts'] * 1e3:.2f} ms, combine {res['combine'] * 1e3:.2f} ms "
          f"(fwd+bwd {res['fwd_bwd'] * 1e3:.2f} ms)")
g = torch.Generator().manual_seed(0)
x_all = torch.randn(W * T, d, generator=g, dtype=torch.float64)
router_w = torch.randn(d, E, generator=g, dtype=torch.float64) / d**0.5
w1 = torch.randn(E, d, 2 * n, generator=g, dtype=torch.float64) / d**0.5
w2 = torch.randn(E, n, d, generator=g, dtype=torch.float64) / n**0.5
t = measure(lambda: moe_forward(x_all, router_w, w1, w2, K), reps=5, flush_l2=False)
print(f"single process, all {W * T} tokens, forward: {t.median_ms:.2f} ms")
# --8<-- [end:split_time]

# %% [markdown]
r"""
<!-- --8<-- [start:rounding_md] -->
## Token rounding meets EP

Token rounding makes every expert's count a multiple of the tile $M_\text{tile}$. Under EP the counts
are per rank: `sonic_learn` rounds on the **home rank**, so every rank sends each expert a multiple of
the tile and the expert's total is one too, with no extra collective. The price: each rank rounds
its own share, so an expert's count can move by up to $W$ half-tiles instead of one, and the quality
condition of the paper (tokens per expert per tile $\ge 2$) holds for the **local** ratio
$T_r K / (E\, M_\text{tile})$, which is $W$ times smaller than the ratio of the global counts.
<!-- --8<-- [end:rounding_md] -->
"""

# %%
# --8<-- [start:rounding]
T_r, K7, E7, tile = 24576, 8, 128, 128  # the 7B layer, T_r tokens on each rank
for world in (1, 8):
    local = T_r * K7 / (E7 * tile)
    print(f"W={world}: tokens per expert per tile, local {local:.1f}, global {world * local:.1f}")
if torch.cuda.is_available():  # GPU only: the fast experts need a Hopper GPU
    print("On a GPU: torchrun --nproc-per-node <W> benchmarks/expert_parallel.py (NCCL)")
# --8<-- [end:rounding]

# %% [markdown]
r"""
<!-- --8<-- [start:exercises] -->
## Exercises

1. **The volume, checked.** Run the layer on 2 ranks with a routing where every token picks experts
   on the *other* rank only, and check that the rows sent equal $T_r K$, the model with no local share.
2. **Memory of the reduced-memory backward under EP.** Which tensor of size $(P, d)$ would an expert
   rank have to keep for $dW_1 = X_e^\top dH$, and what does `sonic_learn` do instead? Count the extra
   all-to-all bytes per layer for the 7B layer on 8 ranks.
3. **Rounding on the home rank.** With $W = 2$, $T_r = 32$, $K = 2$, $E = 4$, $M_\text{tile} = 8$, how
   many rows can one expert receive in the worst case, and why is it always a multiple of 8?

Answer key: `tutorials/answers/07_expert_parallelism.py` (run it; every answer is checked by an assert).
<!-- --8<-- [end:exercises] -->
"""
