"""Answer key for the exercises of tutorial 3 (tutorials/03_grouped_gemm.py). Run: python tutorials/answers/03_grouped_gemm.py

Every answer is computed by the library and checked with an assert, so the key cannot go stale.
In io_cost(T, K, N, ...) K is the GEMM's reduction dim, not the number of experts per token.
"""

import dataclasses

import torch

from sonic_learn.reference.grouped_gemm import (
    gather_fused_grouped_gemm,
    gather_fusion_savings,
    io_cost,
    naive_grouped_gemm,
)
from sonic_learn.reference.moe import aggregate
from sonic_learn.reference.routing import build_metadata, token_rounding, topk_routing

gen = torch.Generator().manual_seed(0)
T, d, n, E, K, TILE, b = 4096, 512, 128, 64, 4, 128, 2
logits = torch.randn(T, E, generator=gen)
counts = build_metadata(topk_routing(logits, K)).expert_counts  # uneven, from a real routing

# ---------------------------------------------------------------------------------------------
# 1. Padding bytes. The naive pipeline's extra traffic over the fused kernel is
#    2 * M_pad * d * b (write + read the padded copy) + (M_pad - M) * N * b (padded output rows).
#    The share due to padding is the part that scales with M_pad - M.
# ---------------------------------------------------------------------------------------------
naive = io_cost(T, d, 2 * n, counts, tile_m=TILE, variant="naive")
fused = io_cost(T, d, 2 * n, counts, tile_m=TILE, variant="gather_fused")
M, M_pad = naive.rows, naive.padded_rows
extra = naive.bytes_moved - fused.bytes_moved
from_padding = 2 * (M_pad - M) * d * b + (M_pad - M) * 2 * n * b
assert extra == 2 * M * d * b + from_padding
print(f"1. rows {M}, padded rows {M_pad}: {100 * from_padding / extra:.1f}% of the naive variant's "
      f"{extra / 2**20:.0f} MiB extra traffic is padding")

# ---------------------------------------------------------------------------------------------
# 2. FLOPs are not saved. Both variants run the full MMA of every expert's last tile (the fused one
#    masks the rows on load and store, not in the tensor cores), so flops_padded is the same.
#    Only counts that are multiples of the tile remove it: token rounding.
# ---------------------------------------------------------------------------------------------
assert naive.flops_padded == fused.flops_padded > 0
rounded = build_metadata(token_rounding(logits, K, tile_m=TILE)).expert_counts
assert io_cost(T, d, 2 * n, rounded, tile_m=TILE, variant="gather_fused").flops_padded == 0
print(f"2. flops_padded {fused.flops_padded / 1e9:.2f} GFLOP in both variants; 0 after token rounding")

# ---------------------------------------------------------------------------------------------
# 3. The down-projection Y = A W2 is io_cost(T, K=n, N=d, counts): reduction n, output width d.
#    There is no gather: A comes out of the up-projection already in grouped row order, so the GEMM
#    reads it contiguously. Its bytes are those of one GEMM kernel (the fused variant's formula,
#    which reads the same M*n*b bytes, contiguous or not), and gather fusion saves nothing there.
# ---------------------------------------------------------------------------------------------
down = io_cost(T, n, d, counts, tile_m=TILE, variant="gather_fused")
E_act = int((counts > 0).sum())
assert down.bytes_read == M * n * b + E_act * n * d * b and down.bytes_written == M * d * b
assert gather_fusion_savings(T, d, n, counts)["down-projection"] == 0
print(f"3. down-projection: io_cost(T, K=n, N=d, counts): reads {down.bytes_read / 2**20:.0f} MiB, "
      f"writes {down.bytes_written / 2**20:.0f} MiB, no gather")

# ---------------------------------------------------------------------------------------------
# 4. Invariance. Shuffle the rows of one expert: permute pair_of_row inside its row range, then
#    recompute gather_idx (the token of each row) and row_of_pair (the inverse) from it. The GEMM
#    output rows of that expert come out in the shuffled order (the same rows, permuted); no other
#    row changes; the layer output after the gather-and-sum does not change at all.
# ---------------------------------------------------------------------------------------------
Ts, ds, Ns, Es, Ks = 32, 16, 8, 4, 2
xs = torch.randn(Ts, ds, generator=gen, dtype=torch.float64)
ws = torch.randn(Es, ds, Ns, generator=gen, dtype=torch.float64)
routing = topk_routing(torch.randn(Ts, Es, generator=gen), Ks)
meta = build_metadata(routing)
e = int(torch.argmax(meta.expert_counts))
lo, hi = int(meta.expert_offsets[e]), int(meta.expert_offsets[e + 1])
perm = torch.randperm(hi - lo, generator=gen) + lo  # a new order for rows lo..hi-1
pair_of_row = meta.pair_of_row.clone()
pair_of_row[lo:hi] = meta.pair_of_row[perm]
row_of_pair = torch.empty_like(pair_of_row)
row_of_pair[pair_of_row.long()] = torch.arange(len(pair_of_row), dtype=pair_of_row.dtype)
shuffled = dataclasses.replace(meta, pair_of_row=pair_of_row, row_of_pair=row_of_pair,
                               gather_idx=routing.token_idx[pair_of_row.long()])
for gemm in (naive_grouped_gemm, gather_fused_grouped_gemm):
    y, y_shuffled = gemm(xs, ws, meta, tile_m=4), gemm(xs, ws, shuffled, tile_m=4)
    assert torch.allclose(y_shuffled[lo:hi], y[perm], atol=1e-12)  # the same rows, permuted
    assert torch.equal(y_shuffled[:lo], y[:lo]) and torch.equal(y_shuffled[hi:], y[hi:])  # others untouched
    scores = routing.scores.double()
    out = aggregate(y, scores[meta.pair_of_row.long()], meta)
    out_shuffled = aggregate(y_shuffled, scores[shuffled.pair_of_row.long()], shuffled)
    assert torch.allclose(out, out_shuffled, atol=1e-12)  # the layer does not see the order
print(f"4. shuffling expert {e}'s rows permutes its GEMM output rows and changes nothing after aggregation")
