"""The assignment set: one assignment per SonicMoE pair, plus a CuTe-DSL kernel exercise.

Each assignment names the student's module (``<name>.py``), the functions (tasks) to implement in it,
the points of each task and the properties that grade it. The properties are defined once, in
``sonic_learn.properties``, and the library's own tests use the same definitions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sonic_learn.properties import Property


@dataclass(frozen=True)
class Task:
    """One function the student writes; its score is ``points * passed / total`` properties."""

    function: str  # the name in the student's module
    points: int
    summary: str
    properties: Callable[[], list[Property]]  # built lazily (imports torch/hypothesis strategies)


@dataclass(frozen=True)
class Assignment:
    number: int
    name: str  # the student's module is <name>.py
    title: str
    summary: str
    tasks: tuple[Task, ...]
    key: str  # dotted module whose functions score 100% (the library's implementation)
    page: str  # the docs page, relative to docs/
    gpu: bool = False  # the exercise needs nvidia-cutlass-dsl (compiles on CPU, runs on a GPU)
    show: Callable[[object], str] | None = None  # after grading: a line computed with the student's module ...
    show_needs: tuple[str, ...] = ()  # ... printed once these tasks pass every property

    @property
    def filename(self) -> str:
        return f"{self.name}.py"

    @property
    def max_points(self) -> int:
        return sum(t.points for t in self.tasks)


def _topk() -> Assignment:
    from sonic_learn.properties import topk as p

    return Assignment(
        1, "topk", "Top-k: radix select vs bitonic top-k",
        "Order-preserving integer keys, radix select (torch.topk's algorithm) and SonicMoE's index-packed bitonic top-k.",
        (
            Task("ordered_int_keys", 1, "floats -> integer keys with the same order", p.keys_properties),
            Task("radix_topk", 2, "top-k by 8-bit digit histograms, ties to the lower column", p.topk_properties),
            Task("bitonic_topk", 2, "top-k by index-packed keys and a bitonic network", p.topk_properties),
        ),
        key="sonic_learn.reference.topk", page="course/topk.md",
    )


def _routing() -> Assignment:
    from sonic_learn.properties import routing as p

    return Assignment(
        2, "routing", "Routing: token-choice top-k vs token rounding",
        "Top-k routing, rounding expert loads to GEMM tiles (nearest rounds halves down), token rounding, routing metadata.",
        (
            Task("topk_routing", 2, "every token's K best experts and their scores", p.topk_routing_properties),
            Task("round_counts", 2, "round f_e to multiples of tile_m (down/up/nearest/stochastic)", p.round_counts_properties),
            Task("token_rounding", 3, "SonicMoE's router: loads rounded to tiles, picks kept first", p.token_rounding_properties),
            Task("build_metadata", 1, "counts, offsets and the pair/row permutations", p.build_metadata_properties),
        ),
        key="sonic_learn.reference.routing", page="course/routing.md",
    )


def _grouped_gemm() -> Assignment:
    from sonic_learn.properties import grouped_gemm as p

    return Assignment(
        3, "grouped_gemm", "Grouped GEMM: naive vs gather-fused, and the IO cost model",
        "A gather+pad grouped GEMM, a gather-fused one with a masked last tile, and the bytes/FLOPs each moves.",
        (
            Task("naive_grouped_gemm", 2, "gather + pad + one GEMM per expert", lambda: p.gemm_properties(fused=False)),
            Task("gather_fused_grouped_gemm", 3, "tiles load their rows through gather_idx; last tile masked",
                 lambda: p.gemm_properties(fused=True)),
            Task("io_cost", 2, "HBM bytes and FLOPs of both variants", p.io_cost_properties),
        ),
        key="sonic_learn.reference.grouped_gemm", page="course/grouped-gemm.md",
    )


def _backward() -> Assignment:
    from sonic_learn.properties import backward as p

    return Assignment(
        4, "backward", "Backward: dS = <dA', A> and the reduced-memory backward",
        "Derive dS without caching Y, implement the dH-kernel epilogue and the expert backward, count the saved bytes.",
        (
            Task("swiglu_backward", 1, "dH from dA for A = up * silu(gate)", p.swiglu_backward_properties),
            Task("dh_epilogue", 2, "dS = <dA', A>, dA = s dA', dH, A' = s A", p.dh_epilogue_properties),
            Task("reduced_memory_backward", 3, "dx, dW1, dW2, dS from X, H and the routing only",
                 p.reduced_memory_backward_properties),
            Task("saved_bytes", 1, "activation bytes cached by each backward", p.saved_bytes_properties),
        ),
        key="sonic_learn.course.keys.backward", page="course/backward.md", show=_show_saved_bytes,
        show_needs=("saved_bytes",),
    )


def _show_saved_bytes(module) -> str:
    """The student's saved_bytes for one fine-grained MoE layer size (bf16): how much Y and gathered X cost."""
    T, d, n, E, K = 16384, 1536, 256, 128, 8
    red = module.saved_bytes(T, d, n, E, T * K, dtype_bytes=2, backward="reduced_memory")
    std = module.saved_bytes(T, d, n, E, T * K, dtype_bytes=2, backward="standard")
    return (f"Your saved_bytes at T={T}, d={d}, n={n}, E={E}, K={K} (bf16): reduced_memory {red / 2**20:.1f} MiB, "
            f"standard {std / 2**20:.1f} MiB ({std / red:.2f}x)")


def _cute_swiglu() -> Assignment:
    from sonic_learn.properties import cute_swiglu as p

    return Assignment(
        5, "cute_swiglu", "GPU: a SwiGLU epilogue kernel in CuTe-DSL",
        "Write an elementwise @cute.kernel, compile it for sm_90a on a CPU, run it on a Hopper GPU when present.",
        (Task("swiglu", 3, "the @cute.jit launcher and its @cute.kernel", p.cute_swiglu_properties),),
        key="sonic_learn.course.keys.cute_swiglu", page="course/cute-swiglu.md", gpu=True,
    )


def all_assignments() -> dict[str, Assignment]:
    """Every assignment, by name, in course order."""
    return {a.name: a for a in (_topk(), _routing(), _grouped_gemm(), _backward(), _cute_swiglu())}


def get_assignment(name: str) -> Assignment:
    assignments = all_assignments()
    if name not in assignments:
        raise ValueError(f"NAME must be one of {tuple(assignments)}, got {name!r}")
    return assignments[name]
