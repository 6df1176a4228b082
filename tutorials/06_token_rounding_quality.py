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

- state the paper's quality claim for token rounding and the condition it comes with: the average
  number of tokens per expert, divided by the tile, $\bar f_e / M_\text{tile} = TK / (E M_\text{tile})$,
  must be at least 2;
- see what happens below it: which pairs and tokens rounding drops, and how the library tells you
  (a `UserWarning` once per shape, and the device-side counts in `Routing.rounding`);
- read the small training run of `benchmarks/train_tiny_moe.py` (a decoder-only MoE language model
  built from `sonic_learn.MoE`, trained with top-k and with token rounding on the same seeds) and
  judge whether the claim held at this scale.

Run it with `python tutorials/06_token_rounding_quality.py` (CPU, seconds). The GPU numbers come
from `benchmarks/results/train_tiny_moe_<device>.json`.
<!-- --8<-- [end:objectives] -->
"""

# %%
# --8<-- [start:setup]
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import torch

from sonic_learn.bench import measure
from sonic_learn.reference.routing import max_pairs, token_rounding, tokens_per_tile, topk_routing

torch.set_printoptions(precision=4, sci_mode=False, linewidth=100)
REPO = Path(__file__).resolve().parent.parent if "__file__" in globals() else Path.cwd()
# --8<-- [end:setup]

# %% [markdown]
r"""
<!-- --8<-- [start:claim_md] -->
## The claim and its condition

Token rounding (chapter 2) trains with a routing that is *not* the model's top-k: each expert's
token count $f_e$ moves to a neighbouring multiple of the tile, so an expert drops its worst
picks (rounding down) or takes the best tokens that did not pick it (rounding up). The paper
(SonicMoE, Table 3 and Tables 7-8) trains 0.5B-1.8B models this way and evaluates them with plain
top-k: the validation perplexity matches top-k training (e.g. 13.10 vs 13.12 at 1.8B) **while**

$$
\frac{\bar f_e}{M_\text{tile}} = \frac{T K}{E\, M_\text{tile}} \;\ge\; 2,
$$

and it degrades at a ratio of 1 (13.55 vs 13.12). The reason is visible in the rounding rule:
an expert can move by up to $M_\text{tile} - 1$ tokens, so the change is small only when
$\bar f_e$ is several tiles. Below the condition a large share of all pairs moves, and with
`nearest` every expert holding fewer than $M_\text{tile}/2$ tokens loses all of them.
<!-- --8<-- [end:claim_md] -->
"""

# %%
# --8<-- [start:below]
T, E, K, tile = 64, 8, 2, 128  # the layer MoE(64, 32, 8, 2) on 64 tokens: ratio 0.125
logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    r = token_rounding(logits, K, tile_m=tile)
print(f"T*K/(E*tile) = {tokens_per_tile(T, E, K, tile):.3f}")
print("warning:", str(caught[0].message)[:160], "...")
st = r.rounding
print(f"kept {int(st.kept_pairs)} of {T * K} pairs; dropped {int(st.dropped_pairs)}, added {int(st.added_pairs)}; "
      f"tokens with no expert left: {int(st.dropped_tokens)} of {T}")
# Check the counts against a count by hand: every f_e is ~16 < 64 = tile/2, so 'nearest' drops all.
f = torch.bincount(topk_routing(logits, K).expert_idx.long(), minlength=E)
assert bool((2 * (f % tile) <= tile).all()) and int(st.dropped_tokens) == T and r.num_pairs == 0
# --8<-- [end:below]

# %% [markdown]
r"""
<!-- --8<-- [start:above_md] -->
Above the condition the same rule moves few pairs. With $T = 4096$ tokens the ratio is 8: each
expert moves by less than one tile out of about eight, and the token-choice picks are kept first.
The counts live on the device (`Routing.rounding`), so the fast layer can report them without a
host synchronization; $P$ is bounded on the host by `max_pairs` (every rounded count is at most
$f_e$ rounded up, capped at $T$), which is what lets the fast path size its buffers without reading
the device.
<!-- --8<-- [end:above_md] -->
"""

# %%
# --8<-- [start:above]
T = 4096
logits = torch.randn(T, E, generator=torch.Generator().manual_seed(1))
r = token_rounding(logits, K, tile_m=tile)
st = r.rounding
moved = (int(st.dropped_pairs) + int(st.added_pairs)) / (T * K)
print(f"T*K/(E*tile) = {tokens_per_tile(T, E, K, tile):.1f}: dropped {int(st.dropped_pairs)}, added "
      f"{int(st.added_pairs)} of {T * K} pairs ({moved:.1%} moved); tokens with no expert: {int(st.dropped_tokens)}")
assert moved < E * tile / (T * K) and r.num_pairs <= max_pairs(T, E, K, tile)
# --8<-- [end:above]

# %% [markdown]
r"""
<!-- --8<-- [start:run_md] -->
## A small training run

`benchmarks/train_tiny_moe.py` trains a byte-level decoder-only language model on the source of
CPython's standard library (every machine with Python has it; the last 10% of the files, sorted by
path, are held out for validation). Four blocks of causal attention and a `sonic_learn.MoE`
feed-forward ($d = 256$, $n = 256$, $E = 16$, $K = 2$, $M_\text{tile} = 128$), bf16, the fast
CuTe-DSL backend on the GPU. The two routings see the same initial weights and the same batches
for each seed, and every model is evaluated with plain top-k, as in the paper. One step routes
$T = 32 \times 256 = 8192$ tokens per layer: a ratio of 8. One more seed runs at $T = 1024$
(4 sequences): a ratio of 1, below the condition.

Here is the same script at CPU size (a few steps of a tiny model, what CI runs), timed:
<!-- --8<-- [end:run_md] -->
"""

# %%
# --8<-- [start:cpu_run]
spec = importlib.util.spec_from_file_location("train_tiny_moe", REPO / "benchmarks" / "train_tiny_moe.py")
tiny = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = tiny
spec.loader.exec_module(tiny)
cfg = tiny.replace(tiny.smoke_config(), steps=4, eval_every=4)
train_bytes, val_bytes, info = tiny.stdlib_bytes(1 << 16, 0.1)
print(f"stdlib: {info['files_total']} files, {info['val_files']} held out")
for routing in ("topk", "token_rounding"):
    run = tiny.train(cfg, routing, 0, train_bytes, val_bytes, "reference", torch.device("cpu"), torch.float32)
    print(f"{routing:>14}: validation loss {run['val_loss'][0][1]:.3f} -> {run['val_loss'][-1][1]:.3f}")
    assert run["val_loss"][-1][1] < run["val_loss"][0][1]
model = tiny.TinyMoELM(cfg, "token_rounding", "reference")
xb, yb = next(tiny.batches(train_bytes, cfg.batch, cfg.seq, torch.Generator().manual_seed(0)))
t_step = measure(lambda: torch.nn.functional.cross_entropy(model(xb).flatten(0, 1), yb.flatten()).backward(),
                 device="cpu", warmup=1, reps=3)
print(f"one CPU training step of the tiny model: {t_step.median_ms:.1f} ms")
# --8<-- [end:cpu_run]

# %%
# --8<-- [start:gpu_step]
if torch.cuda.is_available():  # GPU only: skipped on a CPU machine
    from sonic_learn.fast._cute import fast_available

    ok, why = fast_available()
    backend = "fast" if ok else "reference"
    gpu_model = tiny.TinyMoELM(tiny.Config(), "token_rounding", backend, device="cuda", dtype=torch.bfloat16)
    xg = torch.randint(0, 256, (32, 256), device="cuda")
    t_gpu = measure(lambda: gpu_model(xg).float().sum().backward(), device="cuda")
    print(f"one training step ({backend} backend, T = 8192 per layer): {t_gpu.median_ms:.2f} ms")
# --8<-- [end:gpu_step]

# %% [markdown]
r"""
<!-- --8<-- [start:results_md] -->
## The GPU run's numbers

The JSON of the last GPU run holds every validation-loss curve; the cell below prints the final
losses per routing, their mean and spread over seeds. (Cross-entropy in nats per byte; lower is
better.)
<!-- --8<-- [end:results_md] -->
"""

# %%
# --8<-- [start:results]
results = sorted((REPO / "benchmarks" / "results").glob("train_tiny_moe_*.json"))
if not results:
    print("no train_tiny_moe_<device>.json yet: run benchmarks/train_tiny_moe.py on a GPU")
for path in results:
    res = json.loads(path.read_text())
    print(f"{path.name}: {res['environment']['device']}, {res['config']['steps']} steps, seeds {res['seeds']}")
    for row in res["summary"]:
        print(f"  {row['routing']:>14} at f_e/tile = {row['tokens_per_expert_per_tile']:g}: final val loss "
              f"{row['final_val_loss_mean']:.4f} (min {row['final_val_loss_min']:.4f}, max "
              f"{row['final_val_loss_max']:.4f}, {row['seeds']} seeds)")
    assert tiny.summarize(res["runs"]) == res["summary"]  # the summary is the runs' own numbers
# --8<-- [end:results]

# %% [markdown]
r"""
<!-- --8<-- [start:exercises] -->
## Exercises

1. **Where the condition bites.** For $E = 64$, $K = 8$ and $M_\text{tile} = 128$, find the
   smallest $T$ for which `token_rounding` no longer warns.
2. **Dropped tokens.** At a ratio of 0.5, how many tokens lose every expert with `nearest`, and
   with `up`? Use `Routing.rounding.dropped_tokens`.
3. **A smaller tile.** Rerun the below-condition cell with `tile_m=16`: what is the ratio, and how
   many pairs and tokens are dropped now?

Answer key: `tutorials/answers/06_token_rounding_quality.py` (run it; every answer is checked by an assert).
<!-- --8<-- [end:exercises] -->
"""
