"""Answer key for the exercises of tutorial 7 (tutorials/07_expert_parallelism.py).
Run: python tutorials/answers/07_expert_parallelism.py

Every answer is computed by the library and checked with an assert, so the key cannot go stale.
"""

from _ep_workers import remote_only

from sonic_learn.parallel import alltoall_bytes, launch

# ---------------------------------------------------------------------------------------------
# 1. Every pair remote: with W = 2, E_local = K = 2 and a router that sends rank 0's tokens to
#    rank 1's experts (and back), all T_r*K pair rows leave: the model without its 1/W local share.
# ---------------------------------------------------------------------------------------------
T, d, n, E, K = 16, 8, 8, 4, 2
sent = launch(remote_only, 2, T, d, n, E, K, timeout_s=300)
assert sent == [T * K, T * K], sent
print(f"1. rows sent per rank = {sent[0]} = T_r*K = {T * K} (uniform model: {alltoall_bytes(T, K, d, 2, 1) // (2 * d)})")

# ---------------------------------------------------------------------------------------------
# 2. dW1 = X_e^T dH needs the rows of X that the dispatch delivered: (P_recv, d). The reduced-memory
#    backward does not cache them; it sends them again (one more dispatch-sized all-to-all).
# ---------------------------------------------------------------------------------------------
extra = alltoall_bytes(24576, 8, 1536, 8, 2) / 2  # one direction only: the rows of X, bf16
assert abs(extra - 24576 * 8 * 1536 * 2 * 7 / 8) < 1
print(f"2. the received X rows (P_recv, d) are resent, not cached: {extra / 1e9:.3f} GB more per layer per rank")

# ---------------------------------------------------------------------------------------------
# 3. Rounding on the home rank: each rank sends each expert a multiple of the tile (at most its
#    T_r*K = 64 pairs rounded up, capped at T_r = 32 tokens -> 32), so an expert receives at most
#    2 * 32 = 64 rows, a sum of multiples of 8.
# ---------------------------------------------------------------------------------------------
W, T_r, K3, tile = 2, 32, 2, 8
per_rank_max = min(T_r, -(-T_r * K3 // tile) * tile)  # an expert takes each token at most once
worst = W * per_rank_max
assert worst == 64 and worst % tile == 0
print(f"3. at most {worst} rows per expert, a multiple of {tile} since each rank's share is one")
