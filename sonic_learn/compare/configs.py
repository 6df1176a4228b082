"""Problem sizes for the compare tool, in the paper's notation (T, d, n, E, K) plus the GEMM tile M.

The named configurations are the ones SonicMoE benchmarks (Guo et al., arXiv 2512.14080):

- the iso-FLOP sweep of Table 9b (1.4B / 7B / 30B / 120B, each at three expert granularities; the
  paper's headline "7B" is the finest one, n = 256);
- the "real model" rows of Fig. 15 (v1) / Fig. 12 (v2), whose (d, n, E, K) come from the public
  model configs and T = 32768 (two Kimi-Linear values could not be checked against a public config,
  and are marked so here).

``tour`` is the small default problem of ``python -m sonic_learn.compare`` (it must finish in well
under a minute on a 2-core CPU); ``tiny`` is for tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from sonic_learn import _checks


@dataclass(frozen=True)
class Problem:
    """One MoE layer problem: T tokens of width d, E experts of intermediate width n, K per token."""

    T: int  # tokens in the microbatch
    d: int  # model (hidden) dimension
    n: int  # intermediate dimension of one expert
    E: int  # number of experts
    K: int  # experts per token
    tile_m: int = 128  # M tile of the grouped GEMM (token rounding rounds to multiples of it)
    name: str = "custom"
    note: str = ""

    def __post_init__(self) -> None:
        _checks.check_int_range("T (--tokens)", self.T, 1)
        _checks.check_int_range("d (--d-model)", self.d, 1)
        _checks.check_int_range("n (--d-expert)", self.n, 1)
        _checks.check_int_range("E (--experts)", self.E, 1)
        _checks.check_int_range("K (--top-k)", self.K, 1, self.E, "at most the number of experts E")
        _checks.check_int_range("tile_m (--tile-m)", self.tile_m, 1)

    @property
    def pairs(self) -> int:
        """T*K, the number of (token, expert) pairs of token-choice top-k routing."""
        return self.T * self.K

    def with_overrides(self, **kw) -> Problem:
        """A copy with the given fields replaced (``None`` values are ignored); renamed 'custom' if changed."""
        kw = {k: v for k, v in kw.items() if v is not None}
        changed = {k: v for k, v in kw.items() if getattr(self, k) != v}
        if not changed:
            return self
        base = self.name if self.name != "custom" else ""
        label = ", ".join(f"{k}={v}" for k, v in changed.items() if k != "tile_m")
        name = f"{base} ({label})" if base and label else (base or "custom")
        return replace(self, name=name, **changed)

    def shape_str(self) -> str:
        return f"T={self.T} d={self.d} n={self.n} E={self.E} K={self.K} tile_m={self.tile_m}"

    def as_dict(self) -> dict:
        return asdict(self)


def _p(name, T, d, n, E, K, note=""):
    return Problem(T=T, d=d, n=n, E=E, K=K, name=name, note=note)


_TABLE_9B = "paper Table 9b (iso-FLOP granularity sweep)"
_REAL = "paper Fig. 15/12 real-model config; (d, n, E, K) from the public model config, T = 32768"

CONFIGS: dict[str, Problem] = {
    p.name: p
    for p in [
        # small problems for the quick tour and the tests (not from the paper)
        _p("tour", 1024, 128, 64, 16, 4, "small default for the quick tour (not a paper config)"),
        _p("tiny", 64, 32, 8, 8, 2, "tiny problem for tests (not a paper config)"),
        # Table 9b: (T, d) fixed per model, (n, E, K) = finest / middle / coarsest granularity
        _p("1.4B-n256", 40960, 768, 256, 128, 8, _TABLE_9B),
        _p("1.4B-n512", 40960, 768, 512, 64, 4, _TABLE_9B),
        _p("1.4B-n1024", 40960, 768, 1024, 32, 2, _TABLE_9B),
        _p("7B-n256", 24576, 1536, 256, 128, 8, _TABLE_9B + "; the paper's headline 7B config"),
        _p("7B-n512", 24576, 1536, 512, 64, 4, _TABLE_9B),
        _p("7B-n1024", 24576, 1536, 1024, 32, 2, _TABLE_9B),
        _p("30B-n256", 32768, 4096, 256, 256, 16, _TABLE_9B),
        _p("30B-n512", 32768, 4096, 512, 128, 8, _TABLE_9B),
        _p("30B-n1024", 32768, 4096, 1024, 64, 4, _TABLE_9B),
        _p("120B-n512", 32768, 4096, 512, 256, 16, _TABLE_9B),
        _p("120B-n1024", 32768, 4096, 1024, 128, 8, _TABLE_9B),
        _p("120B-n2048", 32768, 4096, 2048, 64, 4, _TABLE_9B),
        # real-model rows
        _p("olmoe-1b-7b", 32768, 2048, 1024, 64, 8, _REAL),
        _p("gpt-oss-20b", 32768, 2880, 2880, 32, 4, _REAL),
        _p("kimi-linear-48b", 32768, 2304, 1024, 256, 8, _REAL + " (d and n unverified)"),
        _p("qwen3-next-80b", 32768, 2048, 512, 512, 10, _REAL),
        _p("qwen3-235b", 32768, 4096, 1536, 128, 8, _REAL),
        _p("deepseek-v3.2", 32768, 7168, 2048, 256, 8, _REAL),
    ]
}

# Short names: the paper's model names mean their finest-granularity row.
ALIASES = {"1.4B": "1.4B-n256", "7B": "7B-n256", "30B": "30B-n256", "120B": "120B-n512"}

DEFAULT_CONFIG = "tour"


def get_config(name: str) -> Problem:
    """Look up a named configuration (case-insensitive; aliases 1.4B/7B/30B/120B allowed)."""
    if not isinstance(name, str):
        raise TypeError(f"config must be a str, got {type(name).__name__}")
    lookup = {k.lower(): k for k in CONFIGS} | {k.lower(): v for k, v in ALIASES.items()}
    key = lookup.get(name.lower())
    if key is None:
        raise ValueError(f"config must be one of {sorted(CONFIGS) + sorted(ALIASES)}, got {name!r}")
    return CONFIGS[key]
