"""Fast grouped GEMMs for MoE on Hopper (CuTe-DSL): varlen-M with contiguous or gathered A, and varlen-K.

Same names and contracts as ``sonic_learn.reference.grouped_gemm`` (paper Section 3, pair
"gather then GEMM" vs "gather fused into the GEMM's loads"):

* ``naive_grouped_gemm(x, w, meta)``: materialize ``x[gather_idx]`` (here with ``torch.index_select``,
  the classic "gather kernel"), then run the contiguous grouped GEMM on it.
* ``gather_fused_grouped_gemm(x, w, meta)``: the grouped GEMM reads the rows of ``x`` through
  ``gather_idx`` inside its load phase, so the (M, K) gathered copy is never written.
* ``contiguous_grouped_gemm(a, w, meta)``: A is already in expert-grouped row order (e.g. the
  down-projection input ``h``).
* ``grouped_gemm_varlen_k(a, b, meta, gather_a=...)``: weight gradients
  ``dW[e] = a[rows of e]^T @ b[rows of e]``, reduction length f_e per expert.

Shapes (paper notation): x (T, K), w (E, K, N) row-major (N contiguous), out (M, N) with M = number of
(token, expert) pairs = ``meta.gather_idx.numel()``, rows in expert-grouped order
(``meta.expert_offsets``). Inputs bf16 or fp16, fp32 accumulation, ``out_dtype`` bf16/fp16/fp32.

Which kernel runs (the ladder, llm.c style; a ``GemmConfig`` passed as ``config=`` picks one):

1. ``"v1"`` (``v1.GroupedGemmV1``, teaching step): one CTA per output tile, every
   thread loads with cp.async and multiplies with WGMMA, masked scalar epilogue.
2. ``"sm90"`` (``sm90.GroupedGemmSm90``): v1 + shared-memory-staged, coalesced epilogue
   with the ``tile_value`` hook.
3. ``"ws"`` (``ws.GroupedGemmWS``, the default / production kernel): warp-specialized
   (one producer warpgroup, two WGMMA warpgroups, setmaxnreg), mbarrier pipeline, persistent
   static tile scheduler over (expert, m-tile, n-tile) whose expert table it builds in shared
   memory from ``expert_offsets`` (one launch per call, no host-side pass), TMA for the weights
   (and for contiguous A), cp.async per row for gathered A (varlen-K: rows resolved one k-tile
   ahead), a TMA bulk-store epilogue for full tiles (masked 16-byte stores for the expert's ragged
   rows), clusters of 2 CTAs sharing B by TMA multicast where that pays (``cluster_size``: the
   weight-gradient GEMMs), tile 128 x 256 x 64 (128 x 128 x 64 for fp32 output); the epilogue hook
   of the fused MoE epilogues (``gather_fused_grouped_gemm_swiglu`` / ``_dswiglu``).
4. ``"pingpong"`` (``ws.GroupedGemmWS(ping_pong=True)``): step 3 with each MMA warpgroup owning whole
   128 x 128 tiles, so one warpgroup's epilogue overlaps the other's mainloop (opt-in: measured
   slower than step 3 on most shapes); clusters of 2 CTAs on request (``cluster_m=2``). Opt-in:
   the 128 x 192 x 64 tile (``tile=(128, 192, 64)``, three 64-column swizzle atoms), 1.5x the
   arithmetic intensity of 128 x 128 for the short-K plain-store GEMMs (down-projection, dX~;
   upstream SonicMoE runs those as ping-pong 128 x 192 when n is small); on the 7B layer's
   down-projection and dX~ it made the layer 1.5% slower on an H100
   (benchmarks/results/gemm_config_ab_session9_NVIDIA_H100_80GB_HBM3.json).
   A warpgroup then holds 192 fp32 accumulators per thread, so its epilogue is kept lean
   (``ws.GroupedGemmWS.lean_epilogue``) and it runs the plain store only (``lean_tile``,
   ``GemmConfig.fused_epilogues``). The cooperative step 3 takes tile_n = 192 as well.

The MoE layer's GEMMs can each take their own step: ``LayerGemms`` holds one ``GemmConfig`` per
role (``GEMM_ROLES``: up, down, dh, dx, dw) for ``fast.moe.fast_ops``.

The weights ``w (E, K, N)`` are used as stored (N contiguous): WGMMA reads B in its "MN-major"
shared-memory mode and the TMA descriptor views w as (N, K, E), so no transposed copy is made.
The backward needs ``W^T`` (dA = dY W2^T, dX = dH W1^T) and dW2 in (E, n, d): ``transpose_w=True``
takes w stored (E, N, K) and reads it K-major (WGMMA's other B mode, same TMA unit), and
``grouped_gemm_varlen_k(..., transpose_out=True)`` writes ``out[e]^T`` from its epilogue; with the
teaching kernels (v1, sm90) these two options fall back to a torch transposed copy.
Not checked on the device (it would need a device-to-host sync): that ``gather_idx`` holds valid
token indices and that ``expert_offsets`` is a non-decreasing cumsum ending at M; use the
reference's checks when in doubt.

Launch path: each (variant, dtype, out dtype, tile config) is compiled once, ahead of any data,
from fake tensors with symbolic sizes (so one compile serves every T, M, E, K, N), with TVM-FFI
(``--enable-tvm-ffi``): the compiled function takes torch tensors directly and launches on the
current torch stream. No device-to-host synchronization happens on any call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sonic_learn import _checks
from sonic_learn.fast._cute import compiled, launch
from sonic_learn.contracts import RoutingMetadata

IN_DTYPES = (torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_ELEMENTS = 2**31  # 32-bit index arithmetic inside the kernels: the largest index, 2^31 - 1, fits in int32
TILE = (128, 128, 64)  # (tile_m, tile_n, tile_k) of the teaching kernels v1 / sm90
WS_TILE = (128, 256, 64)  # of the production warp-specialized kernel

# The ladder: which kernel runs is part of an immutable ``GemmConfig`` that the caller passes to
# every public function (``config=``; None = ``DEFAULT_CONFIG``, the production kernel).
STEPS = {  # the ladder, one line each: what the step adds to the one before (GemmConfig(kernel=...))
    "v1": "one CTA per output tile: cp.async loads, WGMMA, masked scalar stores from registers (v1.py)",
    "sm90": "+ the tile staged in shared memory and stored as coalesced 16-byte row chunks (sm90.py)",
    "ws": "+ warp specialization, mbarrier pipeline, TMA loads, persistent scheduler, TMA-store epilogue, "
          "clusters (ws.py; production)",
    "pingpong": "+ each MMA warpgroup owns whole tiles, so one's epilogue overlaps the other's mainloop (ws.py; "
                "tile_n up to 192)",
}
KERNELS = tuple(STEPS)
PERSISTENT = ("ws", "pingpong")  # the warp-specialized persistent kernels (fused epilogues, layout options)
PINGPONG_TILE = (128, 128, 64)  # a whole tile's accumulators in one warpgroup
# tile_n each kernel takes. 192 (three 64-column swizzle atoms) is opt-in; on the ping-pong kernel it
# is the plain store's tile only (``lean_tile``).
TILE_NS = {"v1": (64, 128, 256), "sm90": (64, 128, 256), "ws": (64, 128, 192, 256), "pingpong": (64, 128, 192)}
PINGPONG_TILE_NS = TILE_NS["pingpong"]  # a whole 128 x tile_n tile's accumulators in one warpgroup
LEAN_ACC = 128  # fp32 accumulators per MMA thread above which a persistent kernel's epilogue is kept lean
EPILOGUES = ("store", "swiglu", "dswiglu")  # the production kernel's epilogues (epilogues.py)
EPI_SUBTILES = (32, 64)  # GemmConfig(epi_subtile=...): columns per subtile of the subtiled TMA-store epilogue


def _check_cluster_m(cluster_m: object, allow_none: bool) -> None:
    choices = (None, 1, 2) if allow_none else (1, 2)
    if isinstance(cluster_m, bool) or cluster_m not in choices:
        raise ValueError(f"cluster_m must be one of {choices}, got {cluster_m!r}")


def _check_tile(kernel: str, tile: object) -> None:
    """``tile`` = (128, tile_n, tile_k) with a tile_n that ``kernel`` takes (``TILE_NS``), tile_k 32 or 64."""
    if not (isinstance(tile, tuple) and len(tile) == 3 and all(isinstance(v, int) for v in tile)
            and tile[0] == 128 and tile[2] in (32, 64)):
        raise ValueError(f"tile must be (128, tile_n, tile_k in 32/64), got {tile!r}")
    if tile[1] not in TILE_NS[kernel]:
        if kernel == "pingpong":
            raise ValueError(f"the ping-pong kernel keeps a whole tile in one warpgroup: tile_n in "
                             f"{TILE_NS[kernel]}, got {tile}")
        raise ValueError(f"kernel {kernel!r} takes tile_n in {TILE_NS[kernel]}, got tile {tile}")


def lean_tile(tile: tuple, pingpong: bool) -> bool:
    """Does a persistent kernel with this tile hold more than LEAN_ACC fp32 accumulators per MMA
    thread (its warpgroup's rows x tile_n / 128 threads; a ping-pong warpgroup holds the whole tile)?
    Only the ping-pong 128 x 192 tile does (192): its epilogue is kept lean
    (``ws.GroupedGemmWS.lean_epilogue``) and it runs the plain store only -- no fused epilogue, no
    transposed varlen-K store (they spill registers at this size)."""
    rows = tile[0] if pingpong else tile[0] // 2
    return rows * tile[1] // 128 > LEAN_ACC


def _check_lean(kernel: str, tile: tuple, what: str) -> None:
    """A clear error when ``what`` (a fused epilogue or the transposed varlen-K store) is asked of a
    lean tile (``lean_tile``), before any compile or launch."""
    if kernel in PERSISTENT and lean_tile(tile, kernel == "pingpong"):
        raise ValueError(f"{what} does not run on kernel={kernel!r} with tile {tile}: its MMA threads hold "
                         f"{tile[0] * tile[1] // 128} accumulators each and it serves the plain store only "
                         f"(it would spill registers); use a config with tile_n <= 128 for this GEMM")


def _check_epi_subtile(epi_subtile: object, kernel: str, tile: tuple, tma_store: bool) -> None:
    if epi_subtile is None:
        return
    if isinstance(epi_subtile, bool) or epi_subtile not in EPI_SUBTILES:
        raise ValueError(f"epi_subtile must be None or one of {EPI_SUBTILES} (columns per epilogue subtile), "
                         f"got {epi_subtile!r}")
    if kernel != "ws" or not tma_store:
        raise ValueError(f"epi_subtile={epi_subtile} needs kernel='ws' with tma_store=True (it subtiles the "
                         f"TMA-store epilogue), got kernel={kernel!r}, tma_store={tma_store!r}")
    if tile[1] % (2 * epi_subtile):  # two staging buffers take turns: an even number of subtiles
        raise ValueError(f"epi_subtile={epi_subtile} needs tile_n to be a multiple of {2 * epi_subtile} "
                         f"(an even number of subtiles), got tile {tile}")


EPI_PREFETCH_LEAD = 8  # GemmConfig(epi_prefetch=...)'s usual lead, in k-tiles (the config syntax's bare "pf")


def _check_epi_prefetch(epi_prefetch: object, kernel: str) -> None:
    if isinstance(epi_prefetch, bool) or not isinstance(epi_prefetch, int) or epi_prefetch < 0:
        raise TypeError(f"epi_prefetch must be an int >= 0 (k-tiles of lead of the L2 prefetch of the dH "
                        f"epilogue's input; 0 = off, e.g. {EPI_PREFETCH_LEAD}), got {epi_prefetch!r}")
    if epi_prefetch and kernel not in PERSISTENT:
        raise ValueError(f"epi_prefetch={epi_prefetch} needs a persistent kernel {PERSISTENT} (its producer "
                         f"warpgroup issues the prefetch), got kernel={kernel!r}")


@dataclass(frozen=True)
class GemmConfig:
    """Which step of the grouped-GEMM ladder runs, and how. Immutable: pass it down (``config=``).

    ``kernel``: "v1" (teaching step), "sm90" (+ shared-memory epilogue), "ws" (production,
    cooperative) or "pingpong" (production, ping-pong). ``tile``: (128, tile_n, tile_k), default the
    kernel's own; tile_n from ``TILE_NS[kernel]``, tile_k 32 or 64. tile_n = 192 (persistent kernels,
    opt-in; 1.5% slower on the 7B layer, see the module docstring) is the ping-pong kernel's wide tile for the short-K plain-store GEMMs
    (down-projection, dX~): it runs the plain store only (``fused_epilogues`` is False; the fused
    SwiGLU / dH epilogues and the transposed varlen-K store are refused with a ValueError, and
    ``LayerGemms`` gives it to the down / dx roles only). ``stages``: pipeline stages (None: as
    many as fit). ``max_ctas`` caps the persistent kernels' grid (None: one CTA per SM; tests use a
    small cap so that every CTA walks many tiles). ``tma_store=False`` gives the persistent kernels' plain store the synchronous
    shared-memory copy-out instead of the TMA bulk store. ``cluster_m=2`` (the persistent kernels,
    "ws" or "pingpong") runs the kernel in clusters of 2 CTAs along M sharing each tile's B through
    TMA multicast (e.g. ping-pong in clusters of 2 is upstream SonicMoE's configuration of its dH
    GEMM); None picks per problem (``cluster_size``: "ws" pairs the varlen-K GEMMs only, "pingpong"
    never). ``epi_subtile`` (32 or 64; "ws" with the TMA store
    only; None = the whole-tile buffer): the plain store leaves each warpgroup's accumulators in
    subtiles of 64 rows x ``epi_subtile`` columns through two small staging buffers, so stores
    overlap the next subtile's writes and the freed shared memory becomes pipeline stages
    (``GroupedGemmWS.epilogue_wg_tma_subtiled``). tile_n must be a multiple of 2 x ``epi_subtile``.
    The fused SwiGLU epilogue honours it too: each subtile of H and its half-width subtile of
    A = SwiGLU(H) leave by TMA bulk stores (same values bit for bit). The dH epilogue and the
    transposed varlen-K store ignore it and keep their whole-tile buffer, so one config serves
    every GEMM of the MoE layer. ``epi_prefetch`` = N > 0 (persistent kernels; 0 = off, the
    default: measured slower, see below): the dH epilogue's input H is prefetched into L2 by the producer warpgroup
    while each tile's mainloop runs, N k-tiles before the producer loads the tile's last one
    (``GroupedGemmWS.prefetch_epi_in``; ``EPI_PREFETCH_LEAD`` = 8 is the usual N), so that the
    epilogue, which the cooperative kernel does not overlap with any MMA, reads H from L2 instead of
    DRAM; the other epilogues read no input and ignore it. Same results bit for bit. On an H100 it
    made the dH GEMM 11-14% slower at leads of 4, 8 and 16 k-tiles, cooperative and clustered
    ping-pong alike (``benchmarks/results/dh_epi_prefetch_ab_NVIDIA_H100_80GB_HBM3.json``): the
    epilogue's wait is not DRAM latency that L2 can hide. Kept as an experiment. To give the layer's GEMMs different configs,
    pass a ``LayerGemms`` (one config per role) to ``fast.moe.fast_ops``.
    """

    kernel: str = "ws"
    tile: tuple[int, int, int] | None = None
    stages: int | None = None
    max_ctas: int | None = None
    tma_store: bool = True
    cluster_m: int | None = None
    epi_subtile: int | None = None
    epi_prefetch: int = 0

    def __post_init__(self) -> None:
        kernel, tile, stages = self.kernel, self.tile, self.stages
        _checks.check_choice("kernel", kernel, KERNELS)
        if tile is None:
            tile = {"ws": WS_TILE, "pingpong": PINGPONG_TILE}.get(kernel, TILE)
            object.__setattr__(self, "tile", tile)
        _check_tile(kernel, tile)
        if stages is not None:  # the WS pipeline needs 2 slots; v1/sm90 prefetch stages - 2 k-tiles ahead
            _checks.check_int_range("stages", stages, 2 if kernel in PERSISTENT else 3,
                                    what=f"pipeline stages of '{kernel}'")
        if self.max_ctas is not None:
            _checks.check_int_range("max_ctas", self.max_ctas, 1, what="CTAs of the persistent kernels")
        _checks.check_bool("tma_store", self.tma_store)
        _check_cluster_m(self.cluster_m, allow_none=True)
        if self.cluster_m == 2 and kernel not in PERSISTENT:
            raise ValueError(f"cluster_m={self.cluster_m} needs a persistent kernel {PERSISTENT} (the teaching "
                             f"kernels run one CTA per tile, without clusters), got {kernel!r}")
        _check_epi_subtile(self.epi_subtile, kernel, tile, self.tma_store)
        _check_epi_prefetch(self.epi_prefetch, kernel)

    @property
    def persistent(self) -> bool:
        """A warp-specialized persistent kernel (fused epilogues, native transposes, in-kernel table)."""
        return self.kernel in PERSISTENT

    @property
    def fused_epilogues(self) -> bool:
        """Can this config's kernel run the fused SwiGLU / dH epilogues and the transposed varlen-K
        store? Every config but the lean ping-pong 128 x 192 tile (``lean_tile``), which runs the
        plain store only (the teaching kernels run the unfused pairs instead, and count as True)."""
        return not (self.persistent and lean_tile(self.tile, self.kernel == "pingpong"))


DEFAULT_CONFIG = GemmConfig()


def checked_config(config: object) -> GemmConfig:
    """``config`` if it is a ``GemmConfig``, ``DEFAULT_CONFIG`` for None; else a TypeError naming it."""
    if config is None:
        return DEFAULT_CONFIG
    if not isinstance(config, GemmConfig):
        raise TypeError(f"config must be a sonic_learn.fast.grouped_gemm.GemmConfig or None, got {type(config).__name__}")
    return config


# The MoE layer's grouped GEMMs, by the part each plays (``LayerGemms`` gives each its own config).
GEMM_ROLES = {
    "up": "H = X[gather] W1, the up-projection (reduced-memory: X gathered in the loads, SwiGLU in the "
          "epilogue; standard: on the gathered copy of X)",
    "down": "Y = A W2, the down-projection (K = n: a short k-loop)",
    "dh": "dA' = dO[gather] W2^T, the dH GEMM (reduced-memory: dSwiGLU, A' and dS in the epilogue; "
          "standard: dA = dY W2^T, dSwiGLU as a separate pass)",
    "dx": "dX~ = dH W1^T (K = 2n)",
    "dw": "the varlen-K weight gradients dW1 = X^T dH and dW2 = A'^T dO",
}
# The roles whose GEMM needs more than the plain store (``GemmConfig.fused_epilogues``)
FUSED_ROLES = {"up": "the fused SwiGLU epilogue", "dh": "the fused dH epilogue",
               "dw": "the transposed varlen-K store (dW2)"}


@dataclass(frozen=True)
class LayerGemms:
    """One ``GemmConfig`` per grouped GEMM of the MoE layer, by role (``GEMM_ROLES``), so that each
    GEMM can run the kernel that suits it: e.g. the fused SwiGLU and dH epilogues on the ping-pong
    kernel, whose other warpgroup keeps the tensor cores busy while one runs its epilogue, and the
    short-K down-projection and dX~ on the cooperative kernel. Every role defaults to
    ``DEFAULT_CONFIG``; ``LayerGemms.uniform(config)`` gives every role the same config (what
    ``fast.moe.fast_ops(gemm=GemmConfig(...))`` means). Immutable, like ``GemmConfig``."""

    up: GemmConfig = DEFAULT_CONFIG
    down: GemmConfig = DEFAULT_CONFIG
    dh: GemmConfig = DEFAULT_CONFIG
    dx: GemmConfig = DEFAULT_CONFIG
    dw: GemmConfig = DEFAULT_CONFIG

    def __post_init__(self) -> None:
        for role in GEMM_ROLES:
            config = getattr(self, role)
            if not isinstance(config, GemmConfig):
                raise TypeError(f"LayerGemms.{role} (the {role!r} GEMM's config) must be a "
                                f"sonic_learn.fast.grouped_gemm.GemmConfig, got {type(config).__name__}")
            if role in FUSED_ROLES and not config.fused_epilogues:
                raise ValueError(f"LayerGemms.{role}: {config} runs the plain store only (GemmConfig."
                                 f"fused_epilogues is False), and the {role!r} GEMM needs "
                                 f"{FUSED_ROLES[role]}; give that config to the plain-store roles (down, dx)")

    @classmethod
    def uniform(cls, config: GemmConfig) -> LayerGemms:
        """Every role on ``config``."""
        return cls(**{role: checked_config(config) for role in GEMM_ROLES})

    def config(self, role: str) -> GemmConfig:
        """The config of ``role`` (one of ``GEMM_ROLES``)."""
        _checks.check_choice("role", role, tuple(GEMM_ROLES))
        return getattr(self, role)


DEFAULT_LAYER_GEMMS = LayerGemms()  # every role on DEFAULT_CONFIG


def checked_layer_gemms(gemm: object, name: str = "gemm") -> LayerGemms:
    """``gemm`` as a ``LayerGemms``: None -> ``DEFAULT_LAYER_GEMMS``, a ``GemmConfig`` -> every role on
    it, a ``LayerGemms`` as is; else a TypeError naming the argument ``name``."""
    if gemm is None:
        return DEFAULT_LAYER_GEMMS  # (a constant: the production path is traced by torch.compile)
    if isinstance(gemm, GemmConfig):
        return LayerGemms.uniform(gemm)
    if not isinstance(gemm, LayerGemms):
        raise TypeError(f"{name} must be a sonic_learn.fast.grouped_gemm.GemmConfig (every GEMM), a LayerGemms "
                        f"(one config per role: {', '.join(GEMM_ROLES)}) or None, got {type(gemm).__name__}")
    return gemm


def _compiled(cfg: GemmConfig, variant: str, dtype: torch.dtype, out_dtype: torch.dtype, transposed: bool = False,
              epilogue: str = "store"):
    tile = cfg.tile
    if cfg.persistent and out_dtype == torch.float32 and cfg.stages is None:
        # fp32 epilogue buffers are twice as large: halve tile_n (128 x 256 -> 128 x 128 cooperative,
        # 128 x 128 -> 128 x 64 ping-pong, whose buffers hold whole tiles) to keep 4+ pipeline stages
        tile = (tile[0], min(tile[1], 128 if cfg.kernel == "ws" else 64), tile[2])
    return compiled(compile_grouped_gemm, variant, dtype, out_dtype, tile, cfg.stages,
                    kernel=cfg.kernel, transposed=transposed, epilogue=epilogue,
                    tma_store=cfg.tma_store, cluster_m=cluster_size(variant.startswith("varlen_k"), cfg),
                    epi_subtile=cfg.epi_subtile,
                    epi_prefetch=cfg.epi_prefetch if epilogue == "dswiglu" else 0)  # (the only epilogue input)


def cluster_size(varlen_k: bool, config: GemmConfig | None = None) -> int:
    """CTAs per cluster for ``config``'s kernel: its ``cluster_m`` (persistent kernels), or by default
    the rule the tile sweep supports for "ws" (benchmarks/results/grouped_gemm_tiles_*.json, configs
    c1 vs c2): 2 for varlen-K (both CTAs of a pair reduce over the same expert rows, so the multicast
    B costs no padding), 1 for varlen-M (a pair of m-tiles must stay inside one expert, which adds
    about half a tile of padding per expert and costs more than the shared B saves). "pingpong"
    runs without clusters unless asked (its default is unchanged by the opt-in)."""
    cfg = checked_config(config)
    if not cfg.persistent:
        return 1
    if cfg.cluster_m is not None:
        return cfg.cluster_m
    return 2 if varlen_k and cfg.kernel == "ws" else 1


def _epi_args(cfg: GemmConfig, out: torch.Tensor, epi_out=None, epi_in=None, row_in=None, row_out=None) -> tuple:
    """The production kernel's four epilogue tensors (small placeholders where unused); none for the
    teaching kernels."""
    if not cfg.persistent:
        return ()
    dev = out.device
    return (epi_out if epi_out is not None else _placeholder(out.dtype, dev, 2),
            epi_in if epi_in is not None else _placeholder(out.dtype, dev, 2),
            row_in if row_in is not None else _placeholder(torch.float32, dev, 1),
            row_out if row_out is not None else _placeholder(torch.float32, dev, 2))


@functools.lru_cache(maxsize=None)
def _placeholder(dtype: torch.dtype, device: torch.device, ndim: int) -> torch.Tensor:
    return torch.zeros((1, 8) if ndim == 2 else (8,), dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Validation (runs before any compile or launch)
# ----------------------------------------------------------------------------------------------
def _check_operand(name: str, t: object, ndim: int, dtypes=IN_DTYPES) -> torch.Tensor:
    t = _checks.check_tensor(name, t)
    _checks.check_cuda(name, t)
    _checks.check_ndim(name, t, ndim)
    _checks.check_dtype(name, t, dtypes)
    if t.numel() > MAX_ELEMENTS:
        raise ValueError(f"{name} has {t.numel()} elements; the fast kernels take at most 2^31 (32-bit indexing)")
    return t


def _check_multiple_of_8(name: str, value: int, what: str) -> None:
    if value <= 0 or value % 8:
        raise ValueError(f"{name} ({what}) must be a positive multiple of 8 for 16-byte loads, got {value}")


def _check_meta(meta: object, device: torch.device, cfg: GemmConfig) -> RoutingMetadata:
    if not isinstance(meta, RoutingMetadata):
        raise TypeError(f"meta must be a sonic_learn.reference.routing.RoutingMetadata, got {type(meta).__name__}")
    from sonic_learn.fast.grouped_gemm.v1 import SEARCH_EXPERTS

    E = meta.num_experts
    limit, why = SEARCH_EXPERTS, "the teaching kernels' tile search"
    if cfg.persistent:
        from sonic_learn.fast.grouped_gemm.ws import TABLE_EXPERTS

        limit, why = TABLE_EXPERTS, "the production kernel's expert table in shared memory"
    if not 1 <= E <= limit:
        raise ValueError(f"meta.num_experts must satisfy 1 <= E <= {limit} ({why}), got {E}")
    for field, shape in (("expert_offsets", (E + 1,)), ("gather_idx", (None,))):
        t = _checks.check_tensor(f"meta.{field}", getattr(meta, field))
        _checks.check_shape(f"meta.{field}", t, shape)
        _checks.check_dtype(f"meta.{field}", t, (torch.int32,))
        if t.device != device:
            raise ValueError(f"meta.{field} must be on {device} (the inputs' device), got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"meta.{field} must be contiguous")
    return meta


def _out_dtype(out_dtype: torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return default
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of bfloat16, float16, float32 (or None), got {out_dtype}")
    return out_dtype


def _check_tile_m(tile_m: object) -> None:
    if tile_m != TILE[0]:
        raise ValueError(f"tile_m must be {TILE[0]} for the fast kernel (its M tile), got {tile_m!r}")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Row-major with 16-byte aligned base: the cp.async loads read 16 bytes at a time."""
    t = t.contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return t


# ----------------------------------------------------------------------------------------------
# Compile (not cached here: the launch path caches through _cute.compiled)
# ----------------------------------------------------------------------------------------------
def compile_grouped_gemm(variant: str, dtype: torch.dtype, out_dtype: torch.dtype, tile: tuple = TILE,
                         stages: int | None = None, keep_ptx: bool = False, kernel: str = "ws",
                         transposed: bool = False, epilogue: str = "store", tma_store: bool = True,
                         cluster_m: int = 1, epi_subtile: int | None = None, epi_prefetch: int = 0,
                         options: str = ""):
    """Compile one grouped-GEMM variant for sm_90a from fake tensors (no GPU needed).

    ``variant`` is one of "varlen_m", "varlen_m_gather", "varlen_k", "varlen_k_gather". Sizes (rows,
    K, N, E) are symbolic, so the result serves every problem with these dtypes. Returns the
    TVM-FFI callable ``f(a, b, out, gather_idx, expert_offsets, tile_offsets, num_row_tiles)``; the
    production kernel "ws" takes four more tensors after ``out``, the epilogue's
    ``(epi_out, epi_in, row_in, row_out)`` (placeholders when the epilogue does not use them).
    ``transposed`` (kernel "ws" only): varlen-M takes the weights as (E*N, K) and uses ``w[e]^T``
    (K-major B); varlen-K writes its result as (E*N, d), i.e. ``out[e]^T``.
    ``epilogue`` (kernel "ws", varlen-M only): "store" (out = the product), "swiglu" (out = H,
    epi_out = SwiGLU(H): ``epilogues.SwiGLUEpilogue``) or "dswiglu" (the backward's dH
    kernel: ``epilogues.DSwiGLUEpilogue``).
    ``tma_store`` (persistent kernels, plain store): full tiles leave through a TMA bulk store
    (``GroupedGemmWS.epilogue_wg_tma``); False keeps the synchronous shared-memory copy-out.
    ``cluster_m`` (persistent kernels, "ws" or "pingpong"): CTAs per cluster sharing B by TMA multicast
    (``GroupedGemmWS(cluster_m=...)``).
    ``epi_subtile`` (kernel "ws", TMA store): the subtiled epilogue of the plain store and of the
    SwiGLU epilogue (``GemmConfig``); ignored by the dH epilogue and the transposed varlen-K store,
    which keep the whole-tile buffer.
    ``epi_prefetch`` (persistent kernels): the L2 prefetch of the dH epilogue's input, N k-tiles of
    lead (0 = off; ``GemmConfig``).
    ``options``: more ``cute.compile`` options, e.g. "remarks{ptx}" for ptxas's register and spill
    report on stderr (the compile tests' spill check).
    """
    _checks.check_choice("variant", variant, ("varlen_m", "varlen_m_gather", "varlen_k", "varlen_k_gather"))
    _checks.check_choice("epilogue", epilogue, EPILOGUES)
    _checks.check_choice("kernel", kernel, KERNELS)
    if (transposed or epilogue != "store") and kernel not in PERSISTENT:
        raise ValueError(f"transposed=True and fused epilogues need a persistent kernel {PERSISTENT}, got kernel={kernel!r}")
    _check_tile(kernel, tile)
    if epilogue != "store" and (variant.startswith("varlen_k") or out_dtype == torch.float32):
        raise ValueError(f"epilogue={epilogue!r} needs a varlen-M variant with a 16-bit output")
    if epilogue != "store":
        _check_lean(kernel, tile, f"the fused epilogue={epilogue!r}")
    if transposed and variant.startswith("varlen_k"):
        _check_lean(kernel, tile, "the transposed varlen-K store (transposed=True)")
    from sonic_learn.fast._cute import compile_options, cutlass_dtype, import_cutlass

    cutlass = import_cutlass()
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    from sonic_learn.fast.grouped_gemm.epilogues import DSwiGLUEpilogue, SwiGLUEpilogue
    from sonic_learn.fast.grouped_gemm.sm90 import GroupedGemmSm90, epilogue_smem_bytes
    from sonic_learn.fast.grouped_gemm.v1 import GroupedGemmV1, default_stages
    from sonic_learn.fast.grouped_gemm.ws import GroupedGemmWS, ws_stages

    varlen_k = variant.startswith("varlen_k")
    gather = variant.endswith("gather")
    dt, odt = cutlass_dtype(dtype), cutlass_dtype(out_dtype)

    def mat(elem, rows, cols):
        return make_fake_compact_tensor(elem, (rows, cols), stride_order=(1, 0), assumed_align=16)

    def sym(div=1):
        return cute.sym_int(divisibility=div) if div > 1 else cute.sym_int()

    cols_a, n_dim = sym(8), sym(8)
    a = mat(dt, sym(), cols_a)
    if varlen_k:
        b = mat(dt, sym(), n_dim)  # (M, N) rows in grouped order
        out = mat(odt, sym(), cols_a if transposed else n_dim)  # (E * N, d) if transposed else (E * d, N)
    else:
        b = mat(dt, sym(), cols_a if transposed else n_dim)  # (E * N, K) if transposed else (E * K, N)
        out = mat(odt, sym(), n_dim)  # (M, N)
    vec = lambda: make_fake_compact_tensor(cutlass.Int32, (sym(),), assumed_align=4)  # noqa: E731
    gidx, offs, toffs = vec(), vec(), vec()
    _check_epi_subtile(epi_subtile, kernel, tile, tma_store)
    _check_epi_prefetch(epi_prefetch, kernel)
    cls = {"v1": GroupedGemmV1, "sm90": GroupedGemmSm90, "ws": GroupedGemmWS, "pingpong": GroupedGemmWS}[kernel]
    cls = {"swiglu": SwiGLUEpilogue, "dswiglu": DSwiGLUEpilogue}.get(epilogue, cls)
    if kernel in PERSISTENT:
        if not cls.SUBTILE_OUTPUTS or (varlen_k and transposed):
            epi_subtile = None  # the dH epilogue and the transposed store keep their whole-tile buffer
        fit = ws_stages(tile, out_dtype.itemsize, pingpong=kernel == "pingpong", epi_subtile=epi_subtile,
                        subtile_outputs=cls.SUBTILE_OUTPUTS, tma_store=tma_store,
                        transpose_out=varlen_k and transposed)
        if epi_subtile is not None and stages is not None and stages > fit:
            raise ValueError(f"tile {tile} with epi_subtile={epi_subtile} leaves room for {fit} pipeline stages, "
                             f"got stages={stages}")
        stages = stages or fit
        if stages < 2:
            raise ValueError(f"tile {tile} leaves room for {stages} pipeline stages next to the epilogue buffers")
    stages = stages or default_stages(tile)
    _check_cluster_m(cluster_m, allow_none=False)
    if cluster_m != 1 and kernel not in PERSISTENT:
        raise ValueError(f"cluster_m={cluster_m} needs a persistent kernel {PERSISTENT}, got {kernel!r}")
    if kernel == "sm90":  # the epilogue reuses the A/B stage buffers for the output tile
        ab_bytes = stages * (tile[0] + tile[1]) * tile[2] * 2
        if epilogue_smem_bytes(tile, out_dtype.itemsize) > ab_bytes:
            raise ValueError(f"tile {tile} with {stages} stages leaves too little shared memory for the epilogue")
    layout = {"transpose_out": transposed} if varlen_k else {"b_k_major": transposed}
    steps = {}  # the persistent kernels' own options (steps 3 and 4 of the ladder)
    if kernel in PERSISTENT:
        steps = {"ping_pong": kernel == "pingpong", "tma_store": tma_store, "cluster_m": cluster_m}
        if epi_subtile is not None:
            steps["epi_subtile"] = epi_subtile
        if epi_prefetch:
            steps["epi_prefetch"] = epi_prefetch
    kernel_obj = cls(varlen_k=varlen_k, gather=gather, tile_m=tile[0], tile_n=tile[1], tile_k=tile[2], stages=stages,
                     **layout, **steps)
    opts = compile_options(keep_ptx, options)
    epi = ()
    if kernel in PERSISTENT:  # the epilogue's tensors: epi_out, epi_in (16-bit), row_in (P,), row_out (P, n-tiles)
        f32 = cutlass.Float32
        epi = (mat(odt, sym(), sym(8)), mat(odt, sym(), sym(8)),
               make_fake_compact_tensor(f32, (sym(),), assumed_align=4),
               make_fake_compact_tensor(f32, (sym(), sym()), stride_order=(1, 0), assumed_align=4))
    return cute.compile(kernel_obj, a, b, out, *epi, gidx, offs, toffs, cutlass.Int32(1),
                        make_fake_stream(use_tvm_ffi_env_stream=True), options=opts)


def _tile_offsets(expert_offsets: torch.Tensor, tile_m: int) -> torch.Tensor:
    """tile_offsets[e] = sum_{j<e} ceil(f_j / tile_m), on the device (no host sync)."""
    counts = expert_offsets[1:] - expert_offsets[:-1]  # (E,)
    tiles = torch.div(counts + (tile_m - 1), tile_m, rounding_mode="floor")  # (E,)
    out = torch.zeros_like(expert_offsets)  # (E+1,)
    torch.cumsum(tiles, dim=0, out=out[1:])
    return out


def _grid_size(cfg: GemmConfig, row_tile_bound: int, device: torch.device, varlen_k: bool) -> int:
    """Last launch argument: the row-tile bound (v1/sm90: one CTA per tile, grid.y; surplus CTAs exit
    at once; it is >= sum_e ceil(f_e / tile_m), so no device-to-host copy of the counts is needed)
    or, for the persistent "ws" kernel, one CTA per SM."""
    if cfg.persistent:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        ctas = min(sms, cfg.max_ctas or sms)
        cm = cluster_size(varlen_k, cfg)
        return max(cm, ctas - ctas % cm)  # whole clusters
    return row_tile_bound


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_varlen_m(cfg: GemmConfig, a: torch.Tensor, w: torch.Tensor, meta: RoutingMetadata, gather: bool,
                     out_dtype: torch.dtype, transpose_w: bool, epilogue: str = "store", epi: tuple = ()) -> torch.Tensor:
    """Launch a varlen-M GEMM into a new (M, N) ``out``; a fused ``epilogue`` gets its tensors ``epi``
    (in ``_epi_args`` order) and the kernel must be "ws"."""
    M = meta.gather_idx.numel()
    if transpose_w and not cfg.persistent:  # the teaching kernels read w as stored only
        w, transpose_w = w.transpose(1, 2), False  # teaching kernels: an explicit (E, K, N) copy below
    E, R, C = w.shape  # (E, K, N), or (E, N, K) with transpose_w
    N = R if transpose_w else C
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)  # (M, N)
    if M == 0:
        return out
    fn = _compiled(cfg, "varlen_m_gather" if gather else "varlen_m", a.dtype, out_dtype, transpose_w, epilogue)
    # the teaching kernels take the tile offsets computed here; the persistent ones build their
    # table from expert_offsets in shared memory (no extra kernels or host time per call)
    tile_offsets = meta.expert_offsets if cfg.persistent else _tile_offsets(meta.expert_offsets, TILE[0])
    launch(fn, a.device, _aligned(a), _aligned(w).view(E * R, C), out, *_epi_args(cfg, out, *epi), meta.gather_idx,
           meta.expert_offsets, tile_offsets, _grid_size(cfg, -(-M // TILE[0]) + E, a.device, False))
    return out


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _check_varlen_m(cfg, x, w, meta, tile_m, out_dtype, x_name: str, rows_expected: int | None, transpose_w: object):
    x = _check_operand(x_name, x, 2)
    w = _check_operand("w", w, 3)
    _checks.check_bool("transpose_w", transpose_w)
    shape_name = "(E, N, K) (transpose_w=True)" if transpose_w else "(E, K, N)"
    if w.dtype != x.dtype:
        raise TypeError(f"w must have the same dtype as {x_name} ({x.dtype}), got {w.dtype}")
    _checks.check_same_device(**{x_name: x, "w": w})
    meta = _check_meta(meta, x.device, cfg)
    if rows_expected is None and x.shape[0] != meta.num_tokens:  # gathered: gather_idx indexes x's rows
        raise ValueError(f"{x_name} must have T = meta.num_tokens = {meta.num_tokens} rows (the rows "
                         f"meta.gather_idx indexes), got {x.shape[0]}")
    _check_tile_m(tile_m)
    E = w.shape[0]
    K, N = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    k_axis, n_axis = (2, 1) if transpose_w else (1, 2)
    if E != meta.num_experts:
        raise ValueError(f"w must have shape {shape_name} with E = meta.num_experts = {meta.num_experts}, "
                         f"got {tuple(w.shape)}")
    if x.shape[1] != K:
        raise ValueError(f"{x_name} must have shape (*, K) with K = w.shape[{k_axis}] = {K} (w is {shape_name}), "
                         f"got {tuple(x.shape)}")
    _check_multiple_of_8(f"{x_name}.shape[1]", K, "K")
    _check_multiple_of_8(f"w.shape[{n_axis}]", N, "N")
    M = meta.gather_idx.numel()
    if rows_expected is not None and x.shape[0] != M:
        raise ValueError(f"{x_name} must have M = {M} rows (meta.gather_idx.numel()), got {x.shape[0]}")
    if M * N > MAX_ELEMENTS:
        raise ValueError(f"the output (M, N) = ({M}, {N}) exceeds 2^31 elements")
    if E * K * N > MAX_ELEMENTS:
        raise ValueError(f"w has more than 2^31 elements: {tuple(w.shape)}")
    if K * N >= MAX_ELEMENTS:  # the TMA view's expert stride K*N is a 32-bit value
        raise ValueError(f"one expert's weights w[e] must have fewer than 2^31 elements, got K x N = {K} x {N}")
    return x, w, meta, _out_dtype(out_dtype, x.dtype)


def gather_fused_grouped_gemm(x: torch.Tensor, w: torch.Tensor, meta: RoutingMetadata, *, tile_m: int = 128,
                              out_dtype: torch.dtype | None = None, transpose_w: bool = False,
                              config: GemmConfig | None = None) -> torch.Tensor:
    """out[r] = x[gather_idx[r]] @ w[e(r)], rows of x gathered inside the GEMM's loads. Returns (M, N).

    ``transpose_w=True``: w is stored (E, N, K) and row r is multiplied by ``w[e]^T`` (read K-major
    by the production kernel, no transposed copy). ``config``: the kernel (``GemmConfig``; None = production)."""
    cfg = checked_config(config)
    x, w, meta, out_dtype = _check_varlen_m(cfg, x, w, meta, tile_m, out_dtype, "x", None, transpose_w)
    return _launch_varlen_m(cfg, x, w, meta, True, out_dtype, transpose_w)


def contiguous_grouped_gemm(a: torch.Tensor, w: torch.Tensor, meta: RoutingMetadata, *, tile_m: int = 128,
                            out_dtype: torch.dtype | None = None, transpose_w: bool = False,
                            config: GemmConfig | None = None) -> torch.Tensor:
    """out[r] = a[r] @ w[e(r)] for A already in expert-grouped row order (M, K). Returns (M, N).
    ``transpose_w`` and ``config`` as in ``gather_fused_grouped_gemm``."""
    cfg = checked_config(config)
    a, w, meta, out_dtype = _check_varlen_m(cfg, a, w, meta, tile_m, out_dtype, "a", meta.gather_idx.numel()
                                            if isinstance(meta, RoutingMetadata) else None, transpose_w)
    return _launch_varlen_m(cfg, a, w, meta, False, out_dtype, transpose_w)


def naive_grouped_gemm(x: torch.Tensor, w: torch.Tensor, meta: RoutingMetadata, *, tile_m: int = 128,
                       out_dtype: torch.dtype | None = None, transpose_w: bool = False,
                       config: GemmConfig | None = None) -> torch.Tensor:
    """The classic two-pass path: gather ``x[gather_idx]`` into an (M, K) buffer (torch.index_select),
    then the contiguous grouped GEMM. Same result as ``gather_fused_grouped_gemm``."""
    cfg = checked_config(config)
    x, w, meta, out_dtype = _check_varlen_m(cfg, x, w, meta, tile_m, out_dtype, "x", None, transpose_w)
    x_grouped = torch.index_select(x, 0, meta.gather_idx)  # (M, K): the gather kernel
    return _launch_varlen_m(cfg, x_grouped, w, meta, False, out_dtype, transpose_w)


def gather_fused_grouped_gemm_swiglu(x: torch.Tensor, w: torch.Tensor, meta: RoutingMetadata, *,
                                     tile_m: int = 128, fused: bool = True,
                                     config: GemmConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE up-projection with SwiGLU in the GEMM's epilogue: returns (H, A).

    H = ``gather_fused_grouped_gemm(x, w, meta)`` (M, 2n) with w's columns interleaved (gate = even,
    up = odd, as ``sonic_learn.reference.moe.swiglu``), and A = up * silu(gate) (M, n), computed
    from the rounded H in the same epilogue (so A equals ``moe_kernels.swiglu(H)`` bit for bit).
    16-bit output only; with ``fused=False`` or the teaching kernels (v1, sm90) A is computed by
    the separate kernel (same values).
    """
    _checks.check_bool("fused", fused)
    cfg = checked_config(config)
    if fused:
        _check_lean(cfg.kernel, cfg.tile, "the fused epilogue='swiglu' (fused=True)")
    x, w, meta, out_dtype = _check_varlen_m(cfg, x, w, meta, tile_m, None, "x", None, False)
    if w.shape[2] % 16:
        raise ValueError(f"w.shape[2] (2n) must be a multiple of 16 for the SwiGLU epilogue (n a multiple of 8), "
                         f"got {w.shape[2]}")
    if not fused or not cfg.persistent:
        from sonic_learn.fast import moe_kernels

        h = _launch_varlen_m(cfg, x, w, meta, True, out_dtype, False)
        return h, moe_kernels.swiglu(h)
    a = torch.empty(meta.gather_idx.numel(), w.shape[2] // 2, dtype=out_dtype, device=x.device)  # (M, n)
    h = _launch_varlen_m(cfg, x, w, meta, True, out_dtype, False, "swiglu", (a,))  # (M, 2n)
    return h, a


def gather_fused_grouped_gemm_dswiglu(dout: torch.Tensor, w2: torch.Tensor, meta: RoutingMetadata, h: torch.Tensor,
                                      row_scores: torch.Tensor, *, tile_m: int = 128, fused: bool = True,
                                      config: GemmConfig | None = None):
    """The reduced-memory backward's dH kernel (paper Appendix C): returns (dH, A', dS).

    One GEMM dA' = dout[gather_idx] @ w2[e]^T (dout (T, d), w2 (E, n, d) read K-major) whose
    epilogue, with H (M, 2n) and the score of each grouped row ``row_scores`` (M,) fp32, computes
    dH = dSwiGLU(H, s * dA') (M, 2n), A' = s * SwiGLU(H) (M, n) and dS = <dA', SwiGLU(H)> (M,) fp32,
    in grouped row order; dA' itself is never stored. Same values as ``moe_kernels.swiglu_backward_scaled``
    on the stored dA' (dS up to the order of its fp32 sum). With ``fused=False`` or the teaching
    kernels (v1, sm90) it runs exactly that unfused pair.
    """
    _checks.check_bool("fused", fused)
    cfg = checked_config(config)
    if fused:
        _check_lean(cfg.kernel, cfg.tile, "the fused epilogue='dswiglu' (fused=True)")
    dout, w2, meta, out_dtype = _check_varlen_m(cfg, dout, w2, meta, tile_m, None, "dout", None, True)
    M, n = meta.gather_idx.numel(), w2.shape[1]
    h = _check_operand("h", h, 2)
    _checks.check_shape("h", h, (M, 2 * n))
    if h.dtype != dout.dtype:
        raise TypeError(f"h must have dout's dtype {dout.dtype}, got {h.dtype}")
    row_scores = _check_operand("row_scores", row_scores, 1, (torch.float32,))
    _checks.check_shape("row_scores", row_scores, (M,))
    _checks.check_same_device(dout=dout, h=h, row_scores=row_scores)
    h, row_scores = _aligned(h), row_scores.contiguous()
    if not fused or not cfg.persistent:
        from sonic_learn.fast import moe_kernels

        da_prime = _launch_varlen_m(cfg, dout, w2, meta, True, out_dtype, True)  # (M, n)
        rows = torch.arange(M, dtype=torch.int32, device=dout.device)  # scores already in row order
        return moe_kernels.swiglu_backward_scaled(h, da_prime, row_scores, rows)
    dh = torch.empty_like(h)  # (M, 2n)
    ds_part = torch.empty(M, -(-n // cfg.tile[1]), dtype=torch.float32, device=dout.device)  # (M, n-tiles)
    a_scaled = _launch_varlen_m(cfg, dout, w2, meta, True, out_dtype, True, "dswiglu", (dh, h, row_scores, ds_part))
    return dh, a_scaled, ds_part.sum(dim=1)


def grouped_gemm_varlen_k(a: torch.Tensor, b: torch.Tensor, meta: RoutingMetadata, *, gather_a: bool = True,
                          out_dtype: torch.dtype | None = None, transpose_out: bool = False,
                          config: GemmConfig | None = None) -> torch.Tensor:
    """Weight gradients: out[e] = A_e^T @ b[rows of e], reduced over the f_e rows of expert e.

    A_e = ``a[gather_idx[rows of e]]`` when ``gather_a`` (a is (T, d), e.g. x), else ``a[rows of e]``
    (a is (M, d), already grouped). b is (M, N) in grouped row order. Returns (E, d, N); experts
    with no rows get zeros. ``transpose_out=True`` returns ``out[e]^T``, i.e. (E, N, d), written in
    that orientation by the production kernel's epilogue (no transposed copy). ``config``: the
    kernel (``GemmConfig``; None = production).
    """
    cfg = checked_config(config)
    _checks.check_bool("transpose_out", transpose_out)
    if transpose_out:
        _check_lean(cfg.kernel, cfg.tile, "the transposed varlen-K store (transpose_out=True)")
    a = _check_operand("a", a, 2)
    b = _check_operand("b", b, 2)
    if b.dtype != a.dtype:
        raise TypeError(f"b must have the same dtype as a ({a.dtype}), got {b.dtype}")
    _checks.check_same_device(a=a, b=b)
    meta = _check_meta(meta, a.device, cfg)
    _checks.check_bool("gather_a", gather_a)
    out_dtype = _out_dtype(out_dtype, a.dtype)
    M = meta.gather_idx.numel()
    E = meta.num_experts
    d, N = a.shape[1], b.shape[1]
    if b.shape[0] != M:
        raise ValueError(f"b must have M = {M} rows (meta.gather_idx.numel()), got shape {tuple(b.shape)}")
    if not gather_a and a.shape[0] != M:
        raise ValueError(f"a must have M = {M} rows when gather_a=False, got shape {tuple(a.shape)}")
    if gather_a and a.shape[0] != meta.num_tokens:
        raise ValueError(f"a must have T = meta.num_tokens = {meta.num_tokens} rows when gather_a=True (the rows "
                         f"meta.gather_idx indexes), got {a.shape[0]}")
    _check_multiple_of_8("a.shape[1]", d, "d")
    _check_multiple_of_8("b.shape[1]", N, "N")
    if E * d * N > MAX_ELEMENTS:
        raise ValueError(f"the output (E, d, N) = ({E}, {d}, {N}) exceeds 2^31 elements")
    out_shape = (E, N, d) if transpose_out else (E, d, N)
    if M == 0:  # no rows at all: every expert's gradient is zero (and TMA cannot describe an empty b)
        return torch.zeros(out_shape, dtype=out_dtype, device=a.device)
    native = transpose_out and cfg.persistent  # the teaching kernels write out as stored only
    out = torch.empty((E, N, d) if native else (E, d, N), dtype=out_dtype, device=a.device)
    fn = _compiled(cfg, "varlen_k_gather" if gather_a else "varlen_k", a.dtype, out_dtype, native)
    out2d = out.view(E * out.shape[1], out.shape[2])
    launch(fn, a.device, _aligned(a), _aligned(b), out2d, *_epi_args(cfg, out2d), meta.gather_idx,
           meta.expert_offsets, meta.expert_offsets, _grid_size(cfg, 0, a.device, True))
    if transpose_out and not native:  # teaching kernels: the transposed copy with torch
        out = out.transpose(1, 2).contiguous()
    return out


__all__ = [
    "naive_grouped_gemm",
    "gather_fused_grouped_gemm",
    "contiguous_grouped_gemm",
    "grouped_gemm_varlen_k",
    "gather_fused_grouped_gemm_swiglu",
    "gather_fused_grouped_gemm_dswiglu",
    "compile_grouped_gemm",
    "GemmConfig",
    "DEFAULT_CONFIG",
    "LayerGemms",
    "DEFAULT_LAYER_GEMMS",
    "GEMM_ROLES",
    "checked_layer_gemms",
    "STEPS",
    "checked_config",
    "cluster_size",
]
