"""The fast top-k kernels compile for Hopper (sm_90a) on a machine without a GPU.

CI has no GPU, so this is where a kernel that stops compiling is caught. Each case builds the
kernel from fake tensors (symbolic row count) exactly as ``sonic_learn.fast.topk`` does at run time
and checks the generated PTX: the target is sm_90a, the rows are read with 16-byte vector loads,
nothing spills to local memory, and each kernel uses the instructions its algorithm is made of
(warp shuffles for the bitonic merge; shared-memory atomics for the radix histograms). For the
bitonic kernel it also counts the integer min/max in the PTX: exactly the compare-exchanges its
design says (the cost the lane split trades), and one PRMT per 16-bit key (the cheap key build).
A handful of variants only (each compile takes ~1-3 s on the 2-core CI machine).
"""

from __future__ import annotations

import re

import pytest
import torch

from sonic_learn.fast._cute import cutlass_available, cutlass_dtype  # noqa: E402  (pins sm_90a before cutlass loads)

_ok, _why = cutlass_available()
if not _ok:
    pytest.skip(_why, allow_module_level=True)
from sonic_learn.fast import topk  # noqa: E402

pytestmark = pytest.mark.compile

# (kernel, dtype, N, k, epilogue): every kernel and epilogue, every dtype, power-of-two and
# padded N, power-of-two and rounded-up k.
CASES = [
    ("bitonic", torch.bfloat16, 128, 8, "values"),
    ("bitonic", torch.float16, 200, 3, "values"),
    ("bitonic", torch.float32, 64, 16, "values"),
    ("bitonic", torch.bfloat16, 512, 10, "softmax_topk"),
    ("bitonic", torch.float16, 64, 4, "topk_softmax"),
    ("bitonic", torch.float32, 24, 2, "topk_softmax_normalized"),
    ("bitonic", torch.bfloat16, 4096, 16, "values"),  # 32 lanes per row
    ("radix", torch.bfloat16, 256, 16, "values"),
    ("radix", torch.float16, 8, 8, "values"),
    ("radix", torch.float32, 72, 20, "values"),
]


def _case_id(case):
    kind, dtype, n, k, epilogue = case
    return f"{kind}-{str(dtype).replace('torch.', '')}-N{n}-k{k}-{epilogue}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_kernel_compiles_for_sm90a(case, tmp_path):
    kind, dtype, n, k, epilogue = case
    # --keep-ptx writes a .ptx file: keep it out of the working directory
    compiled = topk.compile_kernel(kind, dtype, n, k, epilogue, extra_options=f"--keep-ptx --dump-dir={tmp_path}")
    ptx = compiled.__ptx__
    assert re.search(r"^\.target sm_90a\b", ptx, re.MULTILINE), "PTX must target sm_90a"
    assert re.search(r"ld\.global[.\w]*\.v4", ptx), "rows must be read with 16-byte vector loads"
    assert ".local" not in ptx, "the kernel spills registers to local memory"
    if kind == "bitonic":
        lanes = topk.BitonicTopK(cutlass_dtype(dtype), n, k, epilogue).loader.lanes_per_row
        if lanes > 1:
            assert "shfl.sync.bfly" in ptx, "the cross-lane merge must use butterfly shuffles"
        assert "atom." not in ptx and ".shared" not in ptx, "bitonic top-k must not touch shared memory"
    else:
        assert re.search(r"atom\.shared[.\w]*\.add", ptx), "radix select histograms use shared-memory atomics"


def test_lane_split_covers_the_row():
    """The per-lane split is a bookkeeping invariant: lanes * elements-per-lane = padded row."""
    for n in (8, 64, 128, 200, 4096):
        for k in (1, 3, 8, 16):
            if k > n:
                continue
            for dtype in (torch.bfloat16, torch.float32):
                op = topk.BitonicTopK(cutlass_dtype(dtype), n, k)
                loader = op.loader
                assert loader.lanes_per_row * loader.per_thread == loader.n_padded >= n
                assert 1 <= loader.lanes_per_row <= 32 and 32 % loader.lanes_per_row == 0
                assert loader.per_thread % op.kp == 0 and loader.per_thread % loader.vec == 0


def test_unsupported_dtype_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"dtype must be one of .*float64"):
        cutlass_dtype(torch.float64)
    with pytest.raises(ValueError, match="dtype must be one of"):
        topk.compile_kernel("bitonic", torch.int32, 64, 8)


def _design_min_max(op) -> tuple[int, int]:
    """(max, min) instructions the bitonic design needs per lane: sort each chunk of kp keys
    (odd-even merge sort), fold chunks 2.. into the running top-kp (kp max, then a bitonic merge),
    then one more fold per butterfly round across the lanes."""
    kp, lanes = op.kp, op.loader.lanes_per_row
    chunks = op.loader.per_thread // kp
    sort = len(topk._odd_even_merge_sort_pairs(kp))  # compare-exchanges: one max + one min each
    merge = (kp // 2) * (kp.bit_length() - 1)  # bitonic merge of kp keys
    folds = chunks - 1 + (lanes.bit_length() - 1)
    return chunks * sort + folds * (kp + merge), chunks * sort + folds * merge


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "bitonic"], ids=[_case_id(c) for c in CASES if c[0] == "bitonic"])
def test_bitonic_ptx_does_the_designed_work(case, tmp_path):
    kind, dtype, n, k, epilogue = case
    compiled = topk.compile_kernel(kind, dtype, n, k, epilogue, extra_options=f"--keep-ptx --dump-dir={tmp_path}")
    ptx = compiled.__ptx__
    op = topk.BitonicTopK(cutlass_dtype(dtype), n, k, epilogue)
    want_max, want_min = _design_min_max(op)
    got_max = len(re.findall(r"\bmax\.s(?:32|64)\b", ptx))
    got_min = len(re.findall(r"\bmin\.s(?:32|64)\b", ptx))
    if k == op.kp and n == op.loader.n_padded:
        assert (got_max, got_min) == (want_max, want_min)
    else:  # the compiler drops work on the kp - k unused slots and on all-padding chunks
        assert want_max // 2 <= got_max <= want_max and want_min // 2 <= got_min <= want_min
    if dtype != torch.float32:  # one sign PRMT per key that can hold a real column
        assert len(re.findall(r"\bprmt\.b32\b", ptx)) >= op.loader.per_thread * n // op.loader.n_padded
