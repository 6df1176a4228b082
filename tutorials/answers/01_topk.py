"""Answer key for the exercises of tutorial 1 (tutorials/01_topk.py). Run: python tutorials/answers/01_topk.py

Every answer is computed by the library and checked with an assert, so the key cannot go stale.
"""

import torch

from sonic_learn.reference import topk as ref_topk
from sonic_learn.reference.topk import (
    TORCH_SINGLE_BLOCK_RADIX_BITS,
    bitonic_topk,
    radix_select_passes,
    radix_topk,
)

# ---------------------------------------------------------------------------------------------
# 1. Passes. float32 keys are 32 bits, float64 keys 64 bits; our digits are 8 bits wide.
#    radix_topk: 32 / 8 = 4 digit passes for float32, 64 / 8 = 8 for float64, each plus the collect
#    pass. torch.topk's single-block kernel reads 2-bit digits: 32 / 2 = 16 passes for float32.
# ---------------------------------------------------------------------------------------------


for dtype, bits, expected in [(torch.float32, 32, 4), (torch.float64, 64, 8)]:
    # the digit loop of _radix_select_columns: `for shift in range(bits - RADIX_BITS, -1, -RADIX_BITS)`
    loop_passes = len(range(bits - ref_topk.RADIX_BITS, -1, -ref_topk.RADIX_BITS))
    assert loop_passes == radix_select_passes(bits) == expected
    assert torch.finfo(dtype).bits == bits
    print(f"1. {dtype}: {loop_passes} digit passes + 1 collect pass")
assert radix_select_passes(32, TORCH_SINGLE_BLOCK_RADIX_BITS) == 16
print("1. torch.topk single-block, float32: up to 16 digit passes (2-bit digits) + its collect")

# ---------------------------------------------------------------------------------------------
# 2. Lossless packing. float16 in float32 leaves 13 low mantissa bits free, so 2**13 = 8192 columns
#    fit; a row of 8193 columns raises a ValueError that names x.shape[-1] and the limit.
# ---------------------------------------------------------------------------------------------
bitonic_topk(torch.randn(1, 8192).half(), 4)  # the widest float16 row: accepted
try:
    bitonic_topk(torch.randn(1, 8193).half(), 4)
    raise AssertionError("a float16 row of 8193 columns must be refused")
except ValueError as err:
    assert "8192" in str(err) and "x.shape[-1]" in str(err), err
    print("2. widest float16 row: 8192 columns; past it:", err)

# ---------------------------------------------------------------------------------------------
# 3. Float32 ties. In a row of 8 the column takes the b = 3 low mantissa bits of the key, so two
#    float32 values that differ only in their lowest mantissa bit become a tie, ordered by column
#    (the docstring's "deliberate, documented approximation"). radix_topk is exact.
# ---------------------------------------------------------------------------------------------
small = torch.tensor(1.0)
large = torch.nextafter(small, torch.tensor(2.0))  # 1 + 2**-23: differs in the lowest bit only
row = torch.full((1, 8), -5.0)
row[0, 0], row[0, 1] = small, large  # the smaller value in the lower column
_, radix_idx = radix_topk(row, 1)
bitonic_val, bitonic_idx = bitonic_topk(row, 1)
assert radix_idx.item() == 1  # exact: the larger value
assert bitonic_idx.item() == 0 and bitonic_val.item() == 1.0  # packed keys tie -> lower column wins
print("3. radix_topk picks column 1 (the larger value); bitonic_topk picks column 0: a packed-key tie")

# ---------------------------------------------------------------------------------------------
# 4. The network for N = 16: blocks of size 2, 4, 8, 16; within a block the strides size/2, ..., 1.
#    10 stages of N/2 = 8 compare-exchanges: 80 in all (log2 N (log2 N + 1) / 2 stages).
# ---------------------------------------------------------------------------------------------
expected_schedule = [(1, 2), (2, 4), (1, 4), (4, 8), (2, 8), (1, 8), (8, 16), (4, 16), (2, 16), (1, 16)]
strides = []
original = ref_topk._compare_exchange


def recording(keys, stride, keep_max):
    strides.append(stride)
    return original(keys, stride, keep_max)


ref_topk._compare_exchange = recording
try:
    out = ref_topk._bitonic_sort_descending(torch.randperm(16)[None])  # unique keys
finally:
    ref_topk._compare_exchange = original
assert torch.equal(out[0], torch.arange(15, -1, -1))
assert strides == [s for s, _ in expected_schedule]
print(f"4. (stride, block size): {expected_schedule}; {len(strides)} stages x 8 = {8 * len(strides)} compare-exchanges")
