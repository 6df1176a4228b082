"""Top-k over the last dim: the classic radix select vs SonicMoE's bitonic top-k (the router).

Pair 1 of SonicMoE (paper v1 Section 4.3, v2 Appendix D, "top-K kernel"): every token keeps its K
largest router logits out of E.

1. **radix select** (``radix_topk``): the classic selection algorithm. Turn every value into an
   integer key whose order is the float order, find the k-th largest key one digit at a time (a
   histogram per digit), then collect the winners. On a GPU every digit is one more pass over the
   row in memory, plus one pass to collect, so the digit width sets the number of passes
   (``radix_select_passes``). This file uses 8-bit digits (``RADIX_BITS``): 2 passes for 16-bit
   keys, 4 for float32, then the collect pass. ``torch.topk`` on a GPU is also a radix select, but
   for rows of a few hundred columns (one thread block per row) it uses 2-bit digits
   (``TORCH_SINGLE_BLOCK_RADIX_BITS``, from ``RADIX_BITS`` in PyTorch's
   ``aten/src/ATen/native/cuda/SortingRadixSelect.cuh``): up to 8 counting passes for bf16/fp16
   and 16 for float32, then its ``gatherTopK`` kernel (``aten/src/ATen/native/cuda/TensorTopK.cu``)
   reads the row again to collect. 8-bit digits appear there only in the multi-block path
   (``mbtopk`` in ``TensorTopK.cu``), which ``should_use_multiblock`` picks for rows that are wide
   for their number (for example more than 4000 rows of at least 400 columns, as a 512-expert
   router's logits; fewer rows must be wider).
2. **bitonic top-k** (``bitonic_topk``): what SonicMoE does. Pack each element's column index into
   the low mantissa bits of its float32 key so that every key in a row is unique, then run a
   bitonic sorting network / top-k merge made only of compare-exchanges. On a GPU the whole row
   stays in registers and warp shuffles: one read of the logits, one write of the K winners.

Both return ``(values, indices)`` like ``torch.topk(x, k, sorted=True)``: values descending,
``values == x.gather(-1, indices)`` exactly, indices int64, and ties broken by the LOWER column
first. Ordering follows torch's float comparisons: ``-inf < ... < -0.0 == 0.0 < ... < +inf``, so
``-0.0`` and ``0.0`` are a tie (the lower column comes first); NaN is rejected.

The router scores build on them: ``softmax_topk`` (Mixtral: top-k, then softmax over the k picks)
and ``topk_softmax`` (Qwen: softmax over all E experts, then top-k, optionally renormalized).
"""

from __future__ import annotations

import torch

from sonic_learn import _checks, contracts

RADIX_BITS = 8  # radix select looks at one 8-bit digit per pass ...
RADIX_BUCKETS = 1 << RADIX_BITS  # ... so every histogram has 256 buckets

# torch.topk's CUDA radix select, for comparison (PyTorch's aten/src/ATen/native/cuda/):
# the single-block kernel (one thread block per row, what a router's (T, E) logits get) reads
# 2-bit digits (RADIX_BITS in SortingRadixSelect.cuh); the multi-block path for very wide rows
# reads 8-bit digits (RADIX_BITS in TensorTopK.cu's mbtopk namespace).
TORCH_SINGLE_BLOCK_RADIX_BITS = 2
TORCH_MULTI_BLOCK_RADIX_BITS = 8


def radix_select_passes(bits: int, radix_bits: int = RADIX_BITS) -> int:
    """Digit passes a radix select makes over a row of ``bits``-bit keys, ``radix_bits`` per digit.

    Each pass histograms one digit, most significant first, so a B-bit key needs ceil(B / r)
    passes; the collect pass that gathers the winners comes on top. This file's design
    (``RADIX_BITS = 8``): 2 passes for bf16/fp16, 4 for float32. ``torch.topk``'s single-block
    kernel (``radix_bits=TORCH_SINGLE_BLOCK_RADIX_BITS``): 8 for bf16/fp16, 16 for float32 (an upper
    bound: it stops early once the k-th value is the only candidate left).
    """
    _checks.check_int_range("bits", bits, 1, what="bits per key, e.g. 16 for bf16")
    _checks.check_int_range("radix_bits", radix_bits, 1, what="bits per digit")
    return -(-bits // radix_bits)

# The integer type with the same width as each float type (to read a float's bits).
_SAME_WIDTH_INT = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}

# bitonic_topk packs the column index into the low mantissa bits of a float32 key. A float16 value
# converted to float32 has its low 23 - 10 = 13 mantissa bits zero, a bfloat16 value its low
# 23 - 7 = 16; so up to 2**13 (float16) or 2**16 (other dtypes) columns fit without losing any bit
# of a 16-bit value. We refuse wider rows rather than silently degrade the ordering.
_BITONIC_MAX_INDEX_BITS = {
    torch.float16: 13,
    torch.bfloat16: 16,
    torch.float32: 16,
    torch.float64: 16,
}


# ----------------------------------------------------------------------------------------------
# Input checks (shared by the four public functions)
# ----------------------------------------------------------------------------------------------


def _check_topk_input(name: str, x: object, k: object, *, allow_inf: bool = True) -> None:
    """Validate ``x`` (a float tensor with >= 1 dim, no NaN) and ``1 <= k <= x.shape[-1]``."""
    _checks.check_tensor(name, x)
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dim (top-k runs over the last dim), got a 0-d tensor")
    _checks.check_dtype(name, x, _checks.FLOAT_DTYPES)
    _checks.check_int_range("k", k, 1, x.shape[-1], what=f"the size of the last dim of {name}")
    contracts.check_finite_values(name, x, allow_inf=allow_inf)


# ----------------------------------------------------------------------------------------------
# Order-preserving integer keys (used by both algorithms)
# ----------------------------------------------------------------------------------------------


def ordered_int_keys(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map floats to int64 keys whose integer order is the float order; returns ``(keys, bits)``.

    The textbook trick works on the B-bit pattern of each float (B = 16, 32 or 64):

    * a positive float's bits, read as an unsigned integer, already grow with the value; setting
      the sign bit lifts all positives above all negatives;
    * a negative float's bits grow with its *magnitude*, i.e. the wrong way; flipping ALL bits
      reverses that order and clears the sign bit.

    That unsigned key ``u`` has ``u_a < u_b  <=>  a < b``. PyTorch has no unsigned 64-bit compare,
    so we store ``s = u - 2**(B-1)`` instead (``u`` with its top bit flipped back): the same order,
    but a *signed* integer that fits in int64 for every B, float64 included. In that signed form:
    non-negative floats keep their bits, negative floats flip their B-1 magnitude bits.

    ``-0.0`` and ``+0.0`` have different bits but compare equal in torch, so ``-0.0`` is first
    turned into ``+0.0``: both get key 0, and the top-k treats them as a tie.
    """
    bits = x.element_size() * 8  # B
    x = torch.where(x == 0, torch.zeros_like(x), x)  # -0.0 -> +0.0 (same shape as x)
    raw = x.view(_SAME_WIDTH_INT[x.dtype]).to(torch.int64)  # the float's bits, sign-extended
    magnitude_mask = (1 << (bits - 1)) - 1  # all B bits except the sign bit
    keys = torch.where(raw < 0, raw ^ magnitude_mask, raw)  # negatives: reverse the magnitude order
    return keys, bits


# ----------------------------------------------------------------------------------------------
# 1. Radix select (the classic algorithm, torch.topk on a GPU)
# ----------------------------------------------------------------------------------------------


def _radix_select_columns(keys: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Columns of the k largest keys of each row, ties to the lower column, unsorted.

    ``keys`` is (R, N) int64 from ``ordered_int_keys``; returns (R, k) int64 column indices in
    ascending column order.
    """
    R = keys.shape[0]
    # `candidate` marks the keys that still agree with the k-th largest key on every digit seen so
    # far; `k_left` is how many of the top k are still to be found among the candidates.
    candidate = torch.ones_like(keys, dtype=torch.bool)  # (R, N)
    k_left = torch.full((R, 1), k, dtype=torch.int64, device=keys.device)  # (R, 1)

    # Step 1: narrow down the k-th largest key, most significant digit first.
    # One iteration = one full pass over the row in memory (radix_select_passes(B) = B/8: 2 for
    # 16-bit floats, 4 for float32). A GPU radix select does the same, plus the collect pass below:
    # that is why a radix select reads the logits several times while SonicMoE's bitonic kernel
    # reads them once.
    for shift in range(bits - RADIX_BITS, -1, -RADIX_BITS):
        digit = (keys >> shift) & (RADIX_BUCKETS - 1)  # (R, N) in [0, 256)
        if shift == bits - RADIX_BITS:
            digit = digit ^ (RADIX_BUCKETS >> 1)  # top digit of the unsigned key u = s + 2**(B-1)

        # Histogram of this digit over the candidates of each row.
        hist = torch.zeros(R, RADIX_BUCKETS, dtype=torch.int64, device=keys.device)  # (R, 256)
        hist.scatter_add_(1, digit, candidate.to(torch.int64))

        # at_or_above[b] = number of candidates whose digit is >= b (a suffix sum).
        at_or_above = hist.flip(-1).cumsum(-1).flip(-1)  # (R, 256), non-increasing in b
        # The k-th largest candidate sits in the highest bucket that still holds >= k_left of them.
        bucket = (at_or_above >= k_left).sum(-1, keepdim=True) - 1  # (R, 1)
        # Candidates in higher buckets are surely in the top k (the collect pass picks them up).
        strictly_above = at_or_above.gather(1, bucket) - hist.gather(1, bucket)  # (R, 1)
        k_left = k_left - strictly_above
        candidate = candidate & (digit == bucket)  # (R, N)

    # Now every candidate has exactly the k-th largest key, and we need k_left of them.
    lowest = torch.iinfo(torch.int64).min
    kth_key = torch.where(candidate, keys, lowest).amax(-1, keepdim=True)  # (R, 1)

    # Step 2 (collect pass): every key > kth_key, then the ties in increasing column order.
    tie_rank = candidate.to(torch.int64).cumsum(-1)  # (R, N): 1, 2, ... along each row's ties
    take = (keys > kth_key) | (candidate & (tie_rank <= k_left))  # (R, N), exactly k per row
    return take.nonzero()[:, 1].reshape(R, k)  # (R, k), nonzero walks rows in column order


# --8<-- [start:radix_topk]
def radix_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last dim by radix select, like ``torch.topk(x, k, sorted=True)``.

    Steps: (0) map values to order-preserving integer keys (``ordered_int_keys``); (1) for each
    8-bit digit, most significant first, histogram the digit over the remaining candidates and
    keep the bucket that holds the k-th largest key; (2) collect every key above the k-th, then the
    ties in column order; (3) sort the k winners (value descending, column ascending).

    Args:
        x: (..., N) float16, bfloat16, float32 or float64; any leading dims (also 0 rows), no NaN.
        k: 1 <= k <= N.

    Returns:
        ``(values, indices)``, both (..., k): ``values == x.gather(-1, indices)`` (same dtype as
        ``x``, differentiable like ``torch.topk``), indices int64; ties (also -0.0 vs 0.0) go to
        the lower column first.
    """
    _check_topk_input("x", x, k)
    N = x.shape[-1]
    rows = x.detach().reshape(-1, N)  # (R, N), R = product of the leading dims

    keys, bits = ordered_int_keys(rows)  # (R, N) int64
    columns = _radix_select_columns(keys, bits, k)  # (R, k), ascending columns

    # Step 3: sort the k winners by key, descending. A stable sort keeps equal keys in their
    # (ascending) column order, so ties come out lower column first.
    order = torch.sort(keys.gather(-1, columns), dim=-1, descending=True, stable=True).indices  # (R, k)
    indices = columns.gather(-1, order).reshape(*x.shape[:-1], k)  # (..., k)
    return x.gather(-1, indices), indices


# --8<-- [end:radix_topk]


# ----------------------------------------------------------------------------------------------
# 2. Bitonic top-k (SonicMoE's algorithm)
# ----------------------------------------------------------------------------------------------


def _compare_exchange(keys: torch.Tensor, stride: int, keep_max: torch.Tensor) -> torch.Tensor:
    """One stage of a sorting network over the last dim.

    Wire i is paired with wire ``i ^ stride``; wires where ``keep_max`` is True keep the larger of
    the pair, the others the smaller. All pairs of all rows are exchanged at once.
    """
    n = keys.shape[-1]
    partner = torch.arange(n, device=keys.device) ^ stride  # (n,)
    other = keys[..., partner]  # (..., n): the partner's key on every wire
    return torch.where(keep_max, torch.maximum(keys, other), torch.minimum(keys, other))


def _bitonic_sort_descending(keys: torch.Tensor) -> torch.Tensor:
    """Sort the last dim (a power of two, unique keys) descending with a bitonic sorting network.

    Blocks of size 2, 4, ..., n are built in turn. Within a level, alternate blocks are sorted
    descending and ascending, so every two neighbours form a *bitonic* sequence (down then up),
    which the strides size/2, ..., 1 then merge into one sorted block. log2(n) levels, and
    1 + 2 + ... + log2(n) compare-exchange stages in all; the wiring never depends on the data.
    """
    n = keys.shape[-1]
    wire = torch.arange(n, device=keys.device)  # (n,)
    size = 2
    while size <= n:
        descending = (wire & size) == 0  # this wire's block is sorted descending
        stride = size // 2
        while stride >= 1:
            is_lower = wire < (wire ^ stride)  # the lower wire of its pair
            keys = _compare_exchange(keys, stride, keep_max=is_lower == descending)
            stride //= 2
        size *= 2
    return keys


def _bitonic_merge_descending(keys: torch.Tensor) -> torch.Tensor:
    """Sort a bitonic last dim (a power of two) descending: strides n/2, ..., 1, lower wire keeps max."""
    n = keys.shape[-1]
    wire = torch.arange(n, device=keys.device)  # (n,)
    stride = n // 2
    while stride >= 1:
        keys = _compare_exchange(keys, stride, keep_max=wire < (wire ^ stride))
        stride //= 2
    return keys


# --8<-- [start:bitonic_topk]
def bitonic_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last dim with SonicMoE's index-packed keys and a bitonic top-k merge.

    Steps:

    1. **Pad** each row to ``N_pad`` = the next power of two with ``-inf``, so the network has a
       power-of-two width.
    2. **Pack** the column into the key. Take the float32 value's order-preserving integer key
       (``ordered_int_keys``: for non-negative floats these are the float's own bits, for negative
       floats the magnitude bits flipped) and overwrite its low ``b = log2(N_pad)`` bits, i.e. the
       float32's low b mantissa bits, with ``N_pad - 1 - col``. Storing the column *inverted*
       makes the lower column the larger key on equal values, so ties go to the lower column; it
       also makes a real ``-inf`` beat the ``-inf`` padding (whose columns are >= N). Every key in
       a row is now unique, so the network needs no tie rule. Packing in the integer domain is
       the bit trick on the float, with the negative values' bits already flipped, so a larger
       magnitude stays smaller; it also avoids one hole of packing a float: ``+inf`` with
       non-zero mantissa bits would be a NaN.
    3. **Sort and merge**: sort chunks of ``k_pad`` = next power of two >= k with a bitonic network,
       then repeatedly fold two sorted chunks into one: the elementwise max of chunk a and chunk b
       reversed holds the top ``k_pad`` of both and is bitonic, and a bitonic merge sorts it.
    4. **Unpack**: the column is read back from the low b bits of the first k keys, and the values
       are re-read exactly with ``x.gather``.

    When is the packing lossless? A float16 value in float32 has at most 10 mantissa bits (float16
    subnormals are normal float32 numbers with at most 9), so its low 23 - 10 = 13 bits are zero;
    a bfloat16 value has 7 mantissa bits, leaving 16 low bits zero. Hence for float16 rows with
    N <= 2**13 = 8192 and bfloat16 rows with N <= 2**16 = 65536 the packed keys order exactly like
    the values and the result equals ``radix_topk`` (ties included). Wider rows raise ValueError.

    For float32 (and float64, first rounded to float32, which is monotone) this is a deliberate,
    documented approximation: the low b mantissa bits of the value are overwritten, so values that
    differ only in those bits (relative difference below about ``2**(b - 23)``) become a tie,
    ordered by column. The selected values may then be out of order by that much, but each
    returned value is exact (re-gathered from ``x``). Float32 values whose low b mantissa bits are
    zero (e.g. bfloat16 values stored as float32) give the exact answer.

    Args:
        x: (..., N) float16, bfloat16, float32 or float64; any leading dims (also 0 rows), no NaN;
            N <= 8192 for float16, N <= 65536 otherwise.
        k: 1 <= k <= N.

    Returns:
        ``(values, indices)`` as ``radix_topk``.
    """
    _check_topk_input("x", x, k)
    N = x.shape[-1]
    index_bits = max(N - 1, 0).bit_length()  # b = log2(N_pad)
    max_bits = _BITONIC_MAX_INDEX_BITS[x.dtype]
    if index_bits > max_bits:
        dtype = str(x.dtype).replace("torch.", "")
        raise ValueError(
            f"x.shape[-1] must be <= {1 << max_bits} for bitonic_topk on {dtype} (the column index must fit "
            f"in the {max_bits} low mantissa bits of a float32 key), got {N}"
        )
    n_pad = 1 << index_bits
    k_pad = 1 << max(k - 1, 0).bit_length()  # chunk width of the top-k merge, k <= k_pad <= n_pad
    rows = x.detach().reshape(-1, N).to(torch.float32)  # (R, N), exact for float16/bfloat16
    R = rows.shape[0]

    # Step 1: pad to a power of two with -inf.
    rows = torch.nn.functional.pad(rows, (0, n_pad - N), value=float("-inf"))  # (R, N_pad)

    # Step 2: pack the inverted column into the low b bits of the order-preserving key.
    keys, _ = ordered_int_keys(rows)  # (R, N_pad) int64, the float32 order
    inverted_col = n_pad - 1 - torch.arange(n_pad, device=x.device)  # (N_pad,)
    keys = ((keys >> index_bits) << index_bits) | inverted_col  # (R, N_pad), unique per row

    # Step 3a: sort every chunk of k_pad keys descending (one sorting network per chunk).
    chunks = _bitonic_sort_descending(keys.reshape(R, n_pad // k_pad, k_pad))  # (R, C, k_pad)
    # Step 3b: fold pairs of sorted chunks until one is left (log2(C) rounds). max(a, reversed b)
    # keeps the larger half of the 2*k_pad keys and is bitonic (down, then up); the merge sorts it.
    while chunks.shape[1] > 1:
        pairs = chunks.reshape(R, chunks.shape[1] // 2, 2, k_pad)  # (R, C/2, 2, k_pad)
        top = torch.maximum(pairs[:, :, 0], pairs[:, :, 1].flip(-1))  # (R, C/2, k_pad), bitonic
        chunks = _bitonic_merge_descending(top)  # (R, C/2, k_pad), sorted descending
    best = chunks[:, 0, :k]  # (R, k), the k largest packed keys, descending

    # Step 4: unpack the column; re-read the exact values from x.
    indices = (n_pad - 1 - (best & (n_pad - 1))).reshape(*x.shape[:-1], k)  # (..., k) int64
    return x.gather(-1, indices), indices


# --8<-- [end:bitonic_topk]


# ----------------------------------------------------------------------------------------------
# Router scores built on the top-k
# ----------------------------------------------------------------------------------------------


def _score_dtype(logits: torch.Tensor) -> torch.dtype:
    """Router scores are float32 (float64 for float64 logits, so gradcheck can run)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# --8<-- [start:softmax_topk]
def softmax_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral-style router scores: top-k of the logits, then a softmax over the k picks.

    Args:
        logits: (..., E) float16, bfloat16, float32 or float64, finite (no NaN, no +-inf).
        k: 1 <= k <= E.

    Returns:
        ``(scores, indices)``, both (..., k): scores float32 (float64 for float64 logits), summing
        to 1 over the last dim and differentiable w.r.t. ``logits`` (the gradient reaches only the
        selected columns); indices int64 as ``radix_topk`` (ties to the lower expert).
    """
    _check_topk_input("logits", logits, k, allow_inf=False)
    _, indices = radix_topk(logits.detach(), k)  # (..., K)
    selected = logits.gather(-1, indices).to(_score_dtype(logits))  # (..., K), differentiable
    return torch.softmax(selected, dim=-1), indices


# --8<-- [end:softmax_topk]


# --8<-- [start:topk_softmax]
def topk_softmax(logits: torch.Tensor, k: int, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-style router scores: softmax over all E experts, then the top k probabilities.

    The softmax is strictly increasing, so the top k probabilities sit at the top k logits; we
    select on the logits (as SonicMoE's fused kernel does), which keeps the indices identical to
    ``radix_topk(logits, k)`` even where two probabilities round to the same float (e.g. both
    underflow to 0).

    Args:
        logits: (..., E) float16, bfloat16, float32 or float64, finite (no NaN, no +-inf).
        k: 1 <= k <= E.
        normalize: if True, rescale the k scores of each row to sum to 1.

    Returns:
        ``(scores, indices)``, both (..., k): scores float32 (float64 for float64 logits),
        differentiable w.r.t. ``logits`` (every column gets a gradient through the softmax's
        denominator); indices int64 as ``radix_topk``.
    """
    _check_topk_input("logits", logits, k, allow_inf=False)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    _, indices = radix_topk(logits.detach(), k)  # (..., K)
    probs = torch.softmax(logits.to(_score_dtype(logits)), dim=-1)  # (..., E), differentiable
    scores = probs.gather(-1, indices)  # (..., K)
    if normalize:
        scores = scores / scores.sum(-1, keepdim=True)
    return scores, indices


# --8<-- [end:topk_softmax]
