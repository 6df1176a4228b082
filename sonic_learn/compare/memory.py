"""Which tensors each backward mode saves: measured with saved-tensor hooks vs the closed form.

Paper Section 3.2: SonicMoE's reduced-memory backward caches X (T, d), H (P, 2n) and the routing,
2Td + 4Pn bytes in bf16; the standard backward also caches the gathered X and Y, both (P, d). The
measurement is ``sonic_learn.reference.moe.saved_tensors`` (autograd's
``saved_tensors_hooks`` around the experts' forward); the closed form is
``expected_saved_bytes``. Each measured tensor is matched to the closed-form term of the same shape.
"""

from __future__ import annotations

import re

import torch

from sonic_learn.compare.configs import Problem
from sonic_learn.compare.pairs import layer
from sonic_learn.compare.pairs.common import score_dtype
from sonic_learn.compare.registry import Setup
from sonic_learn.compare.runner import Work
from sonic_learn.reference.moe import expected_saved_bytes, saved_tensors

MODES = ("standard", "reduced_memory")


def _term_shape(term: str, sizes: dict[str, int]) -> tuple[int, ...] | None:
    """'H (P, 2n)' -> (P, 2*n) evaluated with the problem's sizes; None if the term has no shape."""
    m = re.search(r"\(([^()]*)\)\s*$", term)
    if not m:
        return None
    dims = []
    for part in m.group(1).split(","):
        part = part.strip()
        if not part:
            continue
        expr = re.sub(r"(\d)([A-Za-z])", r"\1*\2", part)
        if not re.fullmatch(r"[0-9A-Za-z+*\- ]+", expr):
            return None
        try:
            dims.append(int(eval(expr, {"__builtins__": {}}, dict(sizes))))  # noqa: S307 - our own term names
        except Exception:  # noqa: BLE001 - an unparsable term is matched by bytes only
            return None
    return tuple(dims)


def work(p: Problem, dtype: torch.dtype) -> Work:
    """The cost model of ``memory_report``: one forward per backward mode, the saved tensors of one
    mode alive at a time."""
    b = torch.empty((), dtype=dtype).element_size()
    weights, acts = layer.sizes(p)
    flops = 2 * layer.FORWARD_FLOPS * p.T * p.K * p.n * p.d
    held = (3 * weights + acts) * b
    return Work(flops_f64=flops, held_bytes=held) if dtype == torch.float64 else Work(flops=flops, held_bytes=held)


def memory_report(problem: Problem, setup: Setup, *, routing: str = "topk", seed: int = 0) -> dict:
    """Saved tensors of both backward modes, matched against the closed form; ``ok`` if all totals agree."""
    case = layer.make_case(problem, setup, seed)
    P = layer.routed_pairs(case, routing)
    p = problem
    sizes = {"T": p.T, "d": p.d, "n": p.n, "E": p.E, "P": P, "K": p.K}
    sd = score_dtype(setup.dtype)
    modes = []
    for mode in MODES:
        measured = list(saved_tensors(case.x, case.router_w, case.w1, case.w2, p.K, backward=mode,
                                      routing=routing, tile_m=p.tile_m))
        terms = dict(expected_saved_bytes(p.T, p.d, p.n, p.E, P, dtype=setup.dtype, backward=mode,
                                          score_dtype=sd))
        expected_total = terms.pop("total")
        rows, left = [], list(measured)
        for term, nbytes in terms.items():
            shape = _term_shape(term, sizes)
            match = next((t for t in left if (shape is None or tuple(t.shape) == shape) and t.nbytes == nbytes), None)
            if match is None:
                match = next((t for t in left if shape is not None and tuple(t.shape) == shape), None)
            if match is not None:
                left.remove(match)
            rows.append({
                "name": term,
                "shape": list(match.shape) if match else None,
                "dtype": str(match.dtype).replace("torch.", "") if match else None,
                "measured_bytes": match.nbytes if match else 0,
                "expected_bytes": nbytes,
            })
        for t in left:  # saved, but not in the closed form
            rows.append({"name": "(not in the closed form)", "shape": list(t.shape),
                         "dtype": str(t.dtype).replace("torch.", ""), "measured_bytes": t.nbytes,
                         "expected_bytes": 0})
        modes.append({
            "backward": mode,
            "tensors": rows,
            "measured_total": sum(t.nbytes for t in measured),
            "expected_total": expected_total,
        })
    by_mode = {m["backward"]: m["measured_total"] for m in modes}
    ratio = by_mode["standard"] / by_mode["reduced_memory"] if by_mode["reduced_memory"] else float("nan")
    return {
        "problem": f"{p.name}: {p.shape_str()}",
        "dtype": str(setup.dtype).replace("torch.", ""),
        "device": str(setup.device),
        "routing": routing,
        "pairs": P,
        "modes": modes,
        "standard_over_reduced": ratio,
        "ok": all(m["measured_total"] == m["expected_total"] for m in modes),
        "caption": (
            "measured: saved_tensors_hooks around the experts' forward (sonic_learn.reference.moe.saved_tensors; "
            "weights excluded, each storage once); closed form: sonic_learn.reference.moe.expected_saved_bytes\n"
            f"the standard backward holds {ratio:.2f}x the bytes of the reduced-memory one here; the gap is the "
            "two (P, d) tensors, gathered X and Y, and grows with K at fixed K*n (expert granularity)"
        ),
    }
