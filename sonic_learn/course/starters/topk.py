"""Assignment 1: top-k over the last dim, radix select vs SonicMoE's bitonic top-k.

Fill in the three functions below. The page docs/course/topk.md has the problem statement and hints.
Grade yourself with:  python -m sonic_learn.course grade topk <this folder>

Contract shared by both top-k functions (the same as torch.topk(x, k, sorted=True) plus a tie rule):
values descending, ``values == x.gather(-1, indices)`` exactly, values in x's dtype, indices int64,
shape (..., k); equal values (also -0.0 vs 0.0) go to the LOWER column first.
"""

from __future__ import annotations

import torch

from sonic_learn import _checks  # check_tensor, check_dtype, check_int_range, check_finite, ...


def ordered_int_keys(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map floats to int64 keys whose integer order is the float order; return ``(keys, bits)``.

    ``bits`` is the width of x's dtype (16, 32 or 64). Read each float's bits as a signed integer of
    the same width (``x.view(torch.int16 / int32 / int64)``), widened to int64. Non-negative floats
    already order correctly; for negative floats the bits grow with the magnitude, so flip the
    B - 1 magnitude bits (xor with 2**(B-1) - 1). Map -0.0 to +0.0 first: they compare equal, so
    they must get the same key.

    Args:
        x: a float16, bfloat16, float32 or float64 tensor of any shape, no NaN.

    Returns:
        (keys, bits): keys int64 with x's shape, ``keys[i] < keys[j]  <=>  x[i] < x[j]``.
    """
    raise NotImplementedError("ordered_int_keys: about 6 lines (view as same-width int, flip negatives)")


def radix_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last dim by radix select (torch.topk on a GPU is one too, with 2-bit digits).

    Steps: (0) keys = ordered_int_keys(x); (1) for each 8-bit digit, most significant first:
    histogram the digit over the candidates (256 buckets), find the bucket holding the k-th largest
    key, remember how many candidates lie in higher buckets, keep only that bucket's candidates;
    (2) collect every key above the k-th largest, then the tied keys in increasing column order
    until k are taken; (3) sort the k winners by key descending, stable (ties keep column order).

    Args:
        x: (..., N) float16, bfloat16, float32 or float64, any leading dims (also 0 rows), no NaN.
        k: 1 <= k <= N.

    Returns:
        (values, indices), both (..., k), as described in the module docstring.

    Raises:
        TypeError: x is not a tensor or not a float dtype; k is not an int.
        ValueError: x is 0-d, k is out of range, or x holds NaN (name the argument in the message).
    """
    raise NotImplementedError("radix_topk: about 35 lines (checks, digit loop with a histogram, collect pass, sort)")


def bitonic_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last dim with index-packed keys and a bitonic network (SonicMoE).

    Steps: (1) convert the rows to float32 and pad them with -inf to N_pad = the next power of two;
    (2) take ordered_int_keys of the float32 values and overwrite the low b = log2(N_pad) bits of
    each key with ``N_pad - 1 - column`` (inverted, so that on equal values the LOWER column is the
    larger key): every key in a row becomes unique; (3) sort the keys descending with a bitonic
    network of compare-exchanges (wire i meets wire i ^ stride), or sort chunks of k_pad and merge
    them; (4) read the columns back from the low b bits of the top k keys and gather the values
    from x.

    The packing is exact when the low b mantissa bits of every float32 value are zero (float16 and
    bfloat16 inputs, or small integers); the grader only uses such inputs.

    Args / Returns / Raises: as radix_topk.
    """
    raise NotImplementedError("bitonic_topk: about 30 lines (pad, pack, bitonic sort, unpack)")
