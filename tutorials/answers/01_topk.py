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
# 2. Lossless packing. A float16 value in float32 leaves its 13 low mantissa bits zero, a bfloat16
#    value 16: SonicMoE's float32 key holds 2**13 = 8192 float16 columns (2**16 bfloat16) before the
#    column field overwrites value bits. bitonic_keys shifts the value's own 16- or 32-bit key up by
#    b = log2(N_pad) bits inside an int64 (32 + b <= 63 bits), so no row a GPU holds is too wide; a
#    float64 key fills 64 bits, so the column becomes a second word (W = 2), compared on ties only.
# ---------------------------------------------------------------------------------------------
wide = torch.randn(1, 8193).half()  # one column past SonicMoE's float16 limit
assert torch.equal(bitonic_topk(wide, 4)[1], radix_topk(wide, 4)[1])
for dtype, words in [(torch.float16, 1), (torch.bfloat16, 1), (torch.float32, 1), (torch.float64, 2)]:
    keys = ref_topk.bitonic_keys(torch.randn(1, 8).to(dtype))  # (R, N_pad, W)
    assert keys.shape[-1] == words and keys.unique(dim=1).shape[1] == 8  # one unique key per column
print("2. float16: 8192 columns in SonicMoE's float32 key, no limit in bitonic_keys; float64 keys are 2 words")

# ---------------------------------------------------------------------------------------------
# 3. Float32 ties. Packed as in Step 3 (float32 keys, the column in the b = 3 low mantissa bits),
#    two float32 values that differ only in their lowest mantissa bit become a tie, and the lower
#    column wins although its value is smaller. bitonic_keys keeps every bit of the value, so
#    bitonic_topk picks the larger value, exactly like radix_topk.
# ---------------------------------------------------------------------------------------------
small = torch.tensor(1.0)
large = torch.nextafter(small, torch.tensor(2.0))  # 1 + 2**-23: differs in the lowest bit only
row = torch.full((1, 8), -5.0)
row[0, 0], row[0, 1] = small, large  # the smaller value in the lower column
b = 3  # N_pad = 8
float32_keys, _ = ref_topk.ordered_int_keys(row)
sonic_packed = ((float32_keys >> b) << b) | (7 - torch.arange(8))  # Step 3's packing
assert sonic_packed[0, 0] > sonic_packed[0, 1]  # the smaller value wins the packed-key tie
assert radix_topk(row, 1)[1].item() == bitonic_topk(row, 1)[1].item() == 1  # both exact: the larger value
print("3. float32-packed keys: column 0 wins a tie it should lose; bitonic_topk and radix_topk pick column 1")

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
    out = ref_topk._bitonic_sort_descending(torch.randperm(16)[None, :, None])  # (1, 16, 1) unique keys
finally:
    ref_topk._compare_exchange = original
assert torch.equal(out[0, :, 0], torch.arange(15, -1, -1))
assert strides == [s for s, _ in expected_schedule]
print(f"4. (stride, block size): {expected_schedule}; {len(strides)} stages x 8 = {8 * len(strides)} compare-exchanges")
