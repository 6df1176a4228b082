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

- say what the router's top-k computes, and why its tie rule matters (the same input must always
  route the same way);
- turn floats into integer keys that sort like the floats, and use them for a **radix select**,
  counting the passes it makes over memory;
- explain SonicMoE's **bitonic top-k**: pack the column index into the key so every key is unique,
  then run a sorting network of compare-exchanges that never depends on the data;
- check both against an oracle, and time them with `sonic_learn.bench.measure`.

Run it with `python tutorials/01_topk.py`, or open it as a notebook with
`jupytext --to notebook tutorials/01_topk.py`. Everything runs on a CPU in seconds; the one
GPU-only cell is guarded by `torch.cuda.is_available()` and says so.
<!-- --8<-- [end:objectives] -->
"""

# %%
# --8<-- [start:setup]
import torch

from sonic_learn.bench import measure
from sonic_learn.reference.topk import (
    bitonic_topk,
    ordered_int_keys,
    TORCH_SINGLE_BLOCK_RADIX_BITS,
    radix_select_passes,
    radix_topk,
    softmax_topk,
    topk_softmax,
)

torch.set_printoptions(precision=3, sci_mode=False, linewidth=100)
gen = torch.Generator().manual_seed(0)
# --8<-- [end:setup]

# %% [markdown]
r"""
<!-- --8<-- [start:math] -->
## The problem

The router scores every token against every expert: a row of $E$ logits per token. Top-k keeps
the $K$ largest of each row, sorted, with their columns (the chosen experts):

$$
\operatorname{topk}(x, K) = \big((x_{i_1}, \dots, x_{i_K}),\ (i_1, \dots, i_K)\big)
\quad\text{with}\quad x_{i_1} \ge x_{i_2} \ge \dots \ge x_{i_K},
$$

and no column left out is larger: $x_j \le x_{i_K}$ for every $j \notin \{i_1, \dots, i_K\}$.

When two logits are equal (common in bf16, which has only 8 significant bits) the **lower column
wins**. A tie rule is part of the contract: without one, two implementations could route the same
token to different experts. This library fixes that rule in every implementation; `torch.topk`
documents no order for ties, so even where its output happens to agree (as in the cell below), it
is not a contract to rely on.
<!-- --8<-- [end:math] -->
"""

# %%
# --8<-- [start:first_look]
logits = torch.tensor([[0.5, 2.0, -1.0, 2.0, 0.25, 1.0, -3.0, 0.0]], dtype=torch.bfloat16)  # (1, E=8)
for name, fn in [("torch.topk", torch.topk), ("radix_topk", radix_topk), ("bitonic_topk", bitonic_topk)]:
    values, indices = fn(logits, 3)
    print(f"{name:>13}: values {values.tolist()}  indices {indices.tolist()}")
# the tie between columns 1 and 3 (both 2.0): our rule puts column 1 first
# --8<-- [end:first_look]

# %% [markdown]
r"""
<!-- --8<-- [start:keys_md] -->
## Step 1: integer keys that sort like the floats

Both algorithms compare integers, not floats. `ordered_int_keys` reads each float's bits as an
integer and fixes the two places where bit order and value order disagree: negative numbers (their
bits grow with the *magnitude*, so their magnitude bits are flipped) and $-0.0$ (turned into $+0.0$,
so the two zeros tie). After that, $a < b \iff \operatorname{key}(a) < \operatorname{key}(b)$.
<!-- --8<-- [end:keys_md] -->
"""

# %%
# --8<-- [start:keys]
values = torch.tensor([float("-inf"), -2.0, -0.5, -0.0, 0.0, 0.5, 2.0, float("inf")], dtype=torch.bfloat16)
keys, bits = ordered_int_keys(values)
print("bits per key:", bits)
for v, key in zip(values.tolist(), keys.tolist()):
    print(f"{v:>6}: key {key:>7}  (digits {key + (1 << bits - 1):016b})")
assert torch.equal(torch.argsort(keys, stable=True), torch.argsort(values.float(), stable=True))
# --8<-- [end:keys]

# %% [markdown]
r"""
<!-- --8<-- [start:radix_md] -->
## Step 2: radix select, one digit per pass

A radix select finds the $K$-th largest key one digit at a time, most significant first. Each
pass builds a histogram of the current digit over the keys still in the running and keeps the
bucket that holds the $K$-th largest; a last pass collects the winners. On a GPU each pass reads
the row from memory again, so the digit width sets the cost: a $B$-bit key with $r$-bit digits
takes $\lceil B/r \rceil$ passes (`radix_select_passes`), plus the collect pass.

- **This library's radix select** (`radix_topk` and its CuTe-DSL kernel) uses 8-bit digits and
  256-bucket histograms: 2 passes for bf16, 4 for float32, then the collect pass.
- **`torch.topk` on a GPU** is a radix select too. For rows of a few hundred columns (a router
  with up to 256 experts) it runs one thread block per row with **2-bit digits** (`RADIX_BITS = 2` in PyTorch's
  `aten/src/ATen/native/cuda/SortingRadixSelect.cuh`): up to 8 counting passes for bf16 and 16
  for float32, then its `gatherTopK` kernel (`aten/src/ATen/native/cuda/TensorTopK.cu`) reads the
  row again to collect the winners. It uses 8-bit digits only in a multi-block path for rows that
  are wide for their number (`mbtopk` in the same file, picked by `should_use_multiblock`: for
  example more than 4000 rows of at least 400 columns, so a 512-expert router takes it).

Here is the first pass of our 8-bit design on a bf16 row, by hand:
<!-- --8<-- [end:radix_md] -->
"""

# %%
# --8<-- [start:radix]
row = torch.randn(1, 16, generator=gen).to(torch.bfloat16)  # (1, 16)
keys, bits = ordered_int_keys(row)
top_digit = ((keys + (1 << bits - 1)) >> (bits - 8)) & 0xFF  # the most significant 8-bit digit
histogram = torch.bincount(top_digit.flatten(), minlength=256)  # (256,)
print("non-empty buckets of the first digit:", {b: int(c) for b, c in enumerate(histogram.tolist()) if c})
k = 4
at_or_above = histogram.flip(0).cumsum(0).flip(0)  # how many keys have a top digit >= b
bucket = int((at_or_above >= k).sum()) - 1
print(f"the {k}-th largest key has top digit {bucket}")
print(f"passes over a {bits}-bit row: ours {radix_select_passes(bits)} + 1 collect, "
      f"torch.topk single-block up to {radix_select_passes(bits, TORCH_SINGLE_BLOCK_RADIX_BITS)} + collect")
values, indices = radix_topk(row, k)
print("radix_topk:", values.tolist(), indices.tolist())
# --8<-- [end:radix]

# %% [markdown]
r"""
<!-- --8<-- [start:bitonic_md] -->
## Step 3: bitonic top-k, one read and a fixed network

SonicMoE's router kernel reads a row once and keeps it in registers. Two ideas make that work:

1. **Pack the column into the key.** A bf16 value widened to float32 has 16 low mantissa bits that
   are always zero. Writing the (inverted) column index there makes every key of a row unique, and
   on equal values the lower column becomes the larger key: the tie rule is built into the key.
2. **Sort with a network.** A bitonic network is a fixed schedule of compare-exchange steps: pair
   wire $i$ with wire $i \oplus s$, keep the max on one side and the min on the other. For $N$
   wires it has $\log_2 N \,(\log_2 N + 1)/2$ stages of $N/2$ compare-exchanges each, and the
   schedule never depends on the data, so there is no branching: on a GPU each stage is a
   compare of two registers, or a warp shuffle when the pair sits in different lanes. For top-k
   only chunks of $k$ are sorted, then sorted chunks are merged, keeping the larger half.
   SonicMoE's kernel (through QuACK's sorting code) sorts each chunk with an *optimal* sorting
   network (the fewest compare-exchanges known for that size) and uses bitonic networks for the
   merges; the reference here uses bitonic networks for both, the simplest schedule to read.
<!-- --8<-- [end:bitonic_md] -->
"""

# %%
# --8<-- [start:bitonic]
row = torch.tensor([[1.0, 3.0, 3.0, -2.0, 0.5]], dtype=torch.bfloat16)  # (1, N=5): columns 1 and 2 tie
n_pad = 8  # the network needs a power of two: pad with -inf
b = (n_pad - 1).bit_length()  # 3 low bits hold the column
keys, _ = ordered_int_keys(torch.nn.functional.pad(row.float(), (0, n_pad - 5), value=float("-inf")))
packed = ((keys >> b) << b) | (n_pad - 1 - torch.arange(n_pad))  # inverted column in the low bits
print("packed keys unique:", packed.unique().numel() == n_pad)
print("column 1 beats column 2 on the tie:", bool(packed[0, 1] > packed[0, 2]))
for N in (8, 64, 256):
    stages = (N.bit_length() - 1) * N.bit_length() // 2
    print(f"N = {N:>3}: {stages} compare-exchange stages of {N // 2} pairs")
print("bitonic_topk:", bitonic_topk(row, 3))
# --8<-- [end:bitonic]

# %% [markdown]
r"""
<!-- --8<-- [start:check_md] -->
## Step 4: check against an oracle

The oracle is a **stable sort in float64**: sort each row descending, keep the first $K$. A stable
sort keeps equal values in column order, which is exactly the tie rule. We draw bf16 logits from a
small set of values so that ties are everywhere, then demand that both algorithms return exactly
the oracle's indices.
<!-- --8<-- [end:check_md] -->
"""

# %%
# --8<-- [start:check]
choices = torch.tensor([-1.0, 0.0, 0.5, 1.0])
x = choices[torch.randint(0, 4, (64, 32), generator=gen)].to(torch.bfloat16)  # (64, 32), many ties
k = 8
oracle = torch.sort(x.double(), dim=-1, descending=True, stable=True).indices[:, :k]  # (64, 8)
for name, fn in [("radix_topk", radix_topk), ("bitonic_topk", bitonic_topk)]:
    values, indices = fn(x, k)
    assert torch.equal(indices, oracle), name
    assert torch.equal(values, x.gather(-1, indices)), name
    print(f"{name}: indices identical to the stable-sort oracle on {x.shape[0]} rows with ties")
# --8<-- [end:check]

# %% [markdown]
r"""
<!-- --8<-- [start:scores_md] -->
## Step 5: from top-k to router scores

The router turns the $K$ picks into weights. Two conventions exist:

- **softmax over the top-k** (Mixtral, SonicMoE's default): $s_j = e^{x_{i_j}} / \sum_{l=1}^{K} e^{x_{i_l}}$;
- **top-k of the softmax** (Qwen): $s_j = e^{x_{i_j}} / \sum_{e=1}^{E} e^{x_e}$, optionally
  renormalized to sum to 1.

Both pick the same experts (softmax is increasing); only the weights differ. Scores are float32.
<!-- --8<-- [end:scores_md] -->
"""

# %%
# --8<-- [start:scores]
logits = torch.randn(4, 8, generator=gen)  # (T=4, E=8)
s1, i1 = softmax_topk(logits, 2)
s2, i2 = topk_softmax(logits, 2)
print("same experts:", torch.equal(i1, i2))
print("softmax_topk scores:", s1, "row sums", s1.sum(-1), sep="\n")
print("topk_softmax scores:", s2, "row sums", s2.sum(-1), sep="\n")
oracle = torch.softmax(logits.double().gather(-1, i1), dim=-1)
assert torch.allclose(s1.double(), oracle, atol=1e-6)
# --8<-- [end:scores]

# %% [markdown]
r"""
<!-- --8<-- [start:measure_md] -->
## Step 6: measure on this device

`sonic_learn.bench.measure` warms up, synchronizes, and reports the median with the 20th and 80th
percentiles. On a CPU this times the *references*, which are written to be read: expect them to be
slower than `torch.topk`. The GPU cell below runs only when CUDA is available.

On a Hopper GPU with CuTe-DSL installed, the GPU cell also runs the CuTe-DSL kernels, each checked
against the reference before it is timed. These are small problems, where fixed per-call
costs (launches, host work) weigh heavily: the [Benchmarks](../benchmarks.md) page has the
measured results at realistic sizes.
<!-- --8<-- [end:measure_md] -->
"""

# %%
# --8<-- [start:measure]
x = torch.randn(1024, 64, generator=gen).to(torch.bfloat16)  # (T=1024, E=64)
for name, fn in [("torch.topk", torch.topk), ("radix_topk", radix_topk), ("bitonic_topk", bitonic_topk)]:
    t = measure(lambda: fn(x, 8), device="cpu", warmup=2, reps=10)
    print(f"cpu  {name:>13}: median {t.median_ms:8.3f} ms  (p20 {t.p20_ms:.3f}, p80 {t.p80_ms:.3f})")

if torch.cuda.is_available():  # GPU only: skipped on a CPU machine
    from sonic_learn.fast._cute import fast_available

    xg = x.cuda()
    impls = [("torch.topk", torch.topk), ("radix_topk", radix_topk), ("bitonic_topk", bitonic_topk)]
    ok, why = fast_available()
    if ok:  # the CuTe-DSL kernels need a Hopper GPU
        from sonic_learn.fast import topk as fast_topk

        # check_finite=False: the NaN check costs a device-to-host sync; x is finite by construction,
        # and each output is checked against the reference before it is timed.
        impls += [("fast radix_topk", lambda t, k: fast_topk.radix_topk(t, k, check_finite=False)),
                  ("fast bitonic_topk", lambda t, k: fast_topk.bitonic_topk(t, k, check_finite=False))]
    else:
        print("CuTe-DSL kernels not run:", why)
    expected = radix_topk(xg, 8)[1]  # the contract: exactly these indices, ties to the lower column
    for name, fn in impls:
        if name != "torch.topk":  # check before timing
            assert torch.equal(fn(xg, 8)[1], expected), name
        t = measure(lambda: fn(xg, 8), device="cuda")
        print(f"cuda {name:>17}: median {t.median_ms:8.3f} ms  (p20 {t.p20_ms:.3f}, p80 {t.p80_ms:.3f})")
else:
    print("no CUDA device here: the GPU timings (torch.topk on CUDA and the CuTe-DSL kernels) are skipped")
# --8<-- [end:measure]

# %% [markdown]
r"""
<!-- --8<-- [start:exercises] -->
## Exercises

1. **Passes.** How many digit passes over a row does `radix_topk` make for float32 logits? For
   float64? How many does `torch.topk`'s single-block kernel make for float32, with 2-bit digits?
   Check your answers against the loop in `_radix_select_columns` and `radix_select_passes`.
2. **Lossless packing.** For float16 inputs the column fits in 13 bits. What is the widest row
   `bitonic_topk` accepts for float16, and what error does it raise past that? Try it.
3. **Float32 ties.** Build two float32 values that differ only in their lowest mantissa bit, put
   them in a row of 8, and compare `bitonic_topk` with `radix_topk`. Explain the result from the
   docstring of `bitonic_topk`.
4. **The network.** Write the list of (stride, block size) pairs that `_bitonic_sort_descending`
   visits for $N = 16$, and count the compare-exchanges.

Answer key: `tutorials/answers/01_topk.py` (run it; every answer is checked by an assert).
<!-- --8<-- [end:exercises] -->
"""
