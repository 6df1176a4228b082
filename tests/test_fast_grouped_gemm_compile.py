"""CPU (CI) checks: every fast grouped-GEMM variant compiles for sm_90a from fake tensors.

No GPU is needed: CuTe-DSL builds the kernel ahead of time from symbolic shapes. The PTX must
target sm_90a, use Hopper's ``wgmma.mma_async`` tensor-core instructions and load the operands with
non-bulk ``cp.async`` (16-byte copies with per-row addresses, which is what makes the gather fusable)
wherever rows are gathered or ragged. The production kernel ("ws") loads the weights (and contiguous
A) with TMA (``cp.async.bulk.tensor``) and reallocates registers with ``setmaxnreg``; the teaching
kernel ("v1") uses cp.async only.
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

from sonic_learn.fast._cute import cutlass_available

pytestmark = pytest.mark.compile

OK, WHY = cutlass_available()

VARIANTS = ["varlen_m", "varlen_m_gather", "varlen_k", "varlen_k_gather"]


def _ptx(variant, dtype, out_dtype, kernel):
    from sonic_learn.fast.grouped_gemm import TILE, WS_TILE, compile_grouped_gemm

    tile = WS_TILE if kernel == "ws" else TILE
    return compile_grouped_gemm(variant, dtype, out_dtype, tile, keep_ptx=True, kernel=kernel).__ptx__


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_production_variant_compiles_for_sm90a(variant, dtype):
    ptx = _ptx(variant, dtype, dtype, "ws")
    assert isinstance(ptx, str) and ".target sm_90a" in ptx
    assert "wgmma.mma_async" in ptx
    assert "setmaxnreg" in ptx, "warp-specialized kernel reallocates registers"
    n_tma = ptx.count("cp.async.bulk.tensor")
    n_cpasync = len(re.findall(r"cp\.async\.c[ga]\.shared\.global", ptx))
    if variant == "varlen_m":  # A and B by TMA
        assert n_tma > 0 and n_cpasync == 0
    elif variant == "varlen_m_gather":  # B by TMA, gathered A rows by cp.async
        assert n_tma > 0 and n_cpasync > 0
    else:  # varlen-K: ragged rows of both operands by cp.async
        assert n_cpasync > 0
    assert (".bf16" in ptx) == (dtype == torch.bfloat16)
    # the plain store: full tiles through TMA bulk stores (shared -> global), ragged ones by st.global
    assert re.search(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared", ptx)
    assert "cp.async.bulk.wait_group.read" in ptx and "st.global.v4" in ptx


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("variant,transposed,epilogue", [
    ("varlen_m", False, "store"), ("varlen_m", True, "store"), ("varlen_m_gather", False, "swiglu"),
    ("varlen_m_gather", True, "dswiglu"), ("varlen_k_gather", True, "store")])
def test_pingpong_kernel_compiles_for_sm90a(variant, transposed, epilogue):
    """Step 4 of the ladder: one MMA warpgroup per 128 x 128 tile, two 64-row WGMMAs per k-block."""
    from sonic_learn.fast.grouped_gemm import PINGPONG_TILE, compile_grouped_gemm

    ptx = compile_grouped_gemm(variant, torch.bfloat16, torch.bfloat16, PINGPONG_TILE, keep_ptx=True,
                               kernel="pingpong", transposed=transposed, epilogue=epilogue).__ptx__
    assert ".target sm_90a" in ptx and "setmaxnreg" in ptx and "cp.async.bulk.tensor" in ptx
    assert ptx.count("wgmma.mma_async") == 2 * (PINGPONG_TILE[2] // 16)  # MMA_M = 2 blocks x 4 k-blocks
    with pytest.raises(ValueError, match=r"whole tile in one warpgroup: tile_n in \(64, 128, 192\)"):
        compile_grouped_gemm(variant, torch.bfloat16, torch.bfloat16, (128, 256, 64), kernel="pingpong",
                             transposed=transposed, epilogue=epilogue)


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("variant,transposed,epilogue", [
    ("varlen_m", False, "store"), ("varlen_m", True, "store"), ("varlen_m_gather", False, "swiglu"),
    ("varlen_m_gather", True, "dswiglu"), ("varlen_k", False, "store"), ("varlen_k_gather", True, "store")])
def test_cluster_kernel_compiles_for_sm90a(variant, transposed, epilogue):
    """Clusters of 2 CTAs along M: B arrives by TMA multicast (each CTA fetches half of it for both),
    a slot is freed by remote mbarrier arrivals from both CTAs' MMA warps, and the CTAs meet at a
    cluster barrier after initializing their barriers and before exiting."""
    from sonic_learn.fast.grouped_gemm import WS_TILE, compile_grouped_gemm

    ptx = compile_grouped_gemm(variant, torch.bfloat16, torch.bfloat16, WS_TILE, keep_ptx=True, transposed=transposed,
                               epilogue=epilogue, cluster_m=2).__ptx__
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "setmaxnreg" in ptx
    assert re.search(r"cp\.async\.bulk\.tensor\.\dd\.shared::cluster\.global[^;]*multicast::cluster", ptx)
    assert "mapa" in ptx and "barrier.cluster.arrive" in ptx and "barrier.cluster.wait" in ptx
    assert _mbarrier_init_counts(ptx) == {PRODUCER_ARRIVALS, 8 * 2}  # 8 MMA warps x 2 CTAs free a slot


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("kernel", ["ws", "pingpong"])
def test_transposed_varlen_k_store_moves_16_byte_runs(kernel):
    """The transposed varlen-K store (dW2) stages the tile column-major and copies 16-byte runs of
    8 consecutive rows m: per thread, 16-bit shared stores in (one per accumulator), then only
    16-byte shared loads and 16-byte global stores out -- no 16-bit shared loads (a row-major
    staging tile read down its columns needs 8 of them per 16-byte store, and each warp store then
    touches 32 lines of out)."""
    from sonic_learn.fast.grouped_gemm import PINGPONG_TILE, WS_TILE, compile_grouped_gemm

    tile = WS_TILE if kernel == "ws" else PINGPONG_TILE
    ptx = compile_grouped_gemm("varlen_k_gather", torch.bfloat16, torch.bfloat16, tile, keep_ptx=True,
                               kernel=kernel, transposed=True).__ptx__
    rows = tile[0] if kernel == "pingpong" else tile[0] // 2  # one warpgroup's rows
    runs = rows * tile[1] // 8 // 128  # 16-byte runs per thread
    assert ptx.count("st.shared.b16") == rows * tile[1] // 128  # one per accumulator
    assert not re.search(r"ld\.shared\.(u|b|s)16", ptx)
    assert ptx.count("ld.shared.v4") == runs and ptx.count("st.global.v4") == runs


PRODUCER_ARRIVALS = 129  # a slot's "full" barrier: 128 cp.async arrivals + the TMA thread's byte count


def _mbarrier_init_counts(ptx: str) -> set[int]:
    """The arrival counts the kernel's mbarriers are initialized with (``mov.b32 %r, N`` then
    ``mbarrier.init [...], %r``): the pipeline's "full" and "empty" barriers."""
    consts = dict(re.findall(r"mov\.b32\s+(%r\d+),\s*(\d+);", ptx))
    return {int(consts[reg]) for reg in re.findall(r"mbarrier\.init\.shared\.b64\s+\[[^]]*\],\s*(%r\d+);", ptx)}


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("variant,transposed,epilogue", [
    ("varlen_m", False, "store"), ("varlen_m_gather", True, "store"), ("varlen_m_gather", False, "swiglu"),
    ("varlen_m_gather", True, "dswiglu"), ("varlen_k_gather", False, "store"), ("varlen_k", True, "store")])
def test_pingpong_cluster_kernel_compiles_for_sm90a(variant, transposed, epilogue):
    """Ping-pong in clusters of 2 CTAs along M (upstream SonicMoE's configuration of its dH GEMM):
    the cooperative kernel's multicast loads, remote slot release and cluster barriers, but a slot
    is read by one MMA warpgroup, so its "empty" barrier counts 4 warps x 2 CTAs (8 arrivals; the
    ping-pong kernel without clusters counts its 128 reading threads). No register spills."""
    from sonic_learn.fast.grouped_gemm import PINGPONG_TILE, compile_grouped_gemm

    def ptx(cluster_m):
        return compile_grouped_gemm(variant, torch.bfloat16, torch.bfloat16, PINGPONG_TILE, keep_ptx=True,
                                    kernel="pingpong", transposed=transposed, epilogue=epilogue,
                                    cluster_m=cluster_m).__ptx__

    pair, alone = ptx(2), ptx(1)
    assert ".target sm_90a" in pair and "setmaxnreg" in pair
    assert pair.count("wgmma.mma_async") == 2 * (PINGPONG_TILE[2] // 16)  # one warpgroup per 128-row tile
    assert re.search(r"cp\.async\.bulk\.tensor\.\dd\.shared::cluster\.global[^;]*multicast::cluster", pair)
    assert "multicast::cluster" not in alone
    assert re.search(r"mapa\.shared::cluster", pair) and "mbarrier.arrive.shared::cluster" in pair
    assert "barrier.cluster.arrive" in pair and "barrier.cluster.wait" in pair
    assert _mbarrier_init_counts(pair) == {PRODUCER_ARRIVALS, 4 * 2}
    assert _mbarrier_init_counts(alone) == {PRODUCER_ARRIVALS, 128}
    assert ".local" not in pair and ".local" not in alone, "register spills to local memory"


def _ptxas_report(**kwargs) -> tuple[str, dict[str, int]]:
    """Compile one variant with ptxas's verbose report ("remarks{ptx}", printed on stderr) and return
    its PTX and the report's stack frame, spill stores and spill loads in bytes. (Register spills
    happen in ptxas, after the PTX: the PTX itself has no ".local" for them.)"""
    from sonic_learn.fast.grouped_gemm import compile_grouped_gemm

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        ptx = compile_grouped_gemm(keep_ptx=True, options="remarks{ptx}", **kwargs).__ptx__
    found = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                       err.getvalue())
    assert len(found) == 1, err.getvalue()[-3000:]  # one kernel, one report
    return ptx, dict(zip(("stack", "spill_stores", "spill_loads"), map(int, found[0])))


PP192 = (128, 192, 64)  # the ping-pong kernel's opt-in wide tile


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("variant,transposed,cluster_m,tma_store", [
    ("varlen_m", False, 1, True), ("varlen_m", True, 1, True), ("varlen_m", False, 2, True),
    ("varlen_m_gather", True, 2, True), ("varlen_m", True, 1, False), ("varlen_k_gather", False, 1, True)],
    ids=["down", "dx", "down-c2", "gather-kmajor-c2", "dx-notma", "varlen_k"])
def test_pingpong_192_compiles_without_spills(variant, transposed, cluster_m, tma_store):
    """The ping-pong kernel with a 128 x 192 tile (the layer's down-projection and dX~ GEMMs, and
    the plain varlen-K store): one warpgroup's two m64n192k16 WGMMAs per k-block, 192 fp32
    accumulators per MMA thread and -- the point of the lean epilogue -- no register spill at the
    usual 56 / 224 setmaxnreg split, by ptxas's own report. The TMA store leaves each warpgroup's
    tile as three bulk stores (one per 64-column swizzle atom; 128 x 128 takes two)."""
    from sonic_learn.fast.grouped_gemm.ws import CONSUMER_REGS, PRODUCER_REGS

    ptx, report = _ptxas_report(variant=variant, dtype=torch.bfloat16, out_dtype=torch.bfloat16, tile=PP192,
                                kernel="pingpong", transposed=transposed, cluster_m=cluster_m, tma_store=tma_store)
    assert ".target sm_90a" in ptx
    assert report == {"stack": 0, "spill_stores": 0, "spill_loads": 0}, report
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n192k16") == 2 * (PP192[2] // 16)
    assert f"setmaxnreg.dec.sync.aligned.u32 \t{PRODUCER_REGS};" in ptx
    assert f"setmaxnreg.inc.sync.aligned.u32 \t{CONSUMER_REGS};" in ptx
    bulk_stores = len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.global\.shared", ptx))
    assert bulk_stores == (3 if tma_store else 0)
    assert "st.global.v4" in ptx  # the expert's ragged rows (and every row without TMA)
    if cluster_m == 2:
        assert re.search(r"cp\.async\.bulk\.tensor\.\dd\.shared::cluster\.global[^;]*multicast::cluster", ptx)
        assert _mbarrier_init_counts(ptx) == {PRODUCER_ARRIVALS, 4 * 2}


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
def test_pingpong_192_pipeline_stages_fit_shared_memory():
    """Stages of the 128 x 192 ping-pong kernel: two whole-tile epilogue buffers (one per MMA
    warpgroup) of 128 x 192 bf16 (48 KB each, unpadded with the TMA store) leave room for 3 stages
    of (128 + 192) x 64 bf16 (40 KB each) in the 227 KB; the padded buffers of tma_store=False for
    2. Counted from the shared-memory budget here (not from ws_stages' own formula), and in the
    PTX as one "full" and one "empty" mbarrier per stage."""
    from sonic_learn.fast.grouped_gemm.ws import TABLE_EXPERTS, ws_stages

    budget, table = 227 * 1024, 4 * (TABLE_EXPERTS + 1)
    stage = (128 + 192) * 64 * 2

    def fits(stages, epi_bytes):  # barriers (first 1 KB: alignment), A/B stages, epilogue buffers, table
        return 1024 + stages * stage + epi_bytes + table <= budget

    tight, padded = 2 * 128 * 192 * 2, 2 * 128 * (192 + 8) * 2
    assert fits(3, tight) and not fits(4, tight) and fits(2, padded) and not fits(3, padded)
    assert ws_stages(PP192, 2, pingpong=True) == 3
    assert ws_stages(PP192, 2, pingpong=True, tma_store=False) == 2
    assert ws_stages(PP192, 2) == 4  # the cooperative kernel's 64-row buffers
    # unchanged for the kernels that are not lean
    assert ws_stages((128, 128, 64), 2, pingpong=True) == ws_stages((128, 128, 64), 2, pingpong=True, tma_store=False)
    from sonic_learn.fast.grouped_gemm import PINGPONG_TILE, compile_grouped_gemm

    def inits(tile, **kw):
        return compile_grouped_gemm("varlen_m", torch.bfloat16, torch.bfloat16, tile, keep_ptx=True,
                                    kernel="pingpong", **kw).__ptx__.count("mbarrier.init")

    assert inits(PP192) - inits(PINGPONG_TILE) == 2 * (3 - ws_stages(PINGPONG_TILE, 2, pingpong=True))
    assert inits(PP192) - inits(PP192, tma_store=False) == 2


def test_lean_tile_is_the_pingpong_192_tile_only():
    """Only the ping-pong 128 x 192 tile holds more than 128 accumulators per MMA thread: every
    other persistent config keeps the epilogue (and the compiled code) it had."""
    from sonic_learn.fast.grouped_gemm import LEAN_ACC, TILE_NS, lean_tile

    assert LEAN_ACC == 128
    assert lean_tile(PP192, pingpong=True)
    for tile_n in TILE_NS["pingpong"][:-1]:
        assert not lean_tile((128, tile_n, 64), pingpong=True)
    for tile_n in TILE_NS["ws"]:
        assert not lean_tile((128, tile_n, 64), pingpong=False)


def test_pingpong_192_config_and_its_limits():
    """GemmConfig(kernel="pingpong", tile=(128, 192, 64)) is accepted (clusters of 2 too); the
    teaching kernels reject tile_n = 192; the fused epilogues and the transposed varlen-K store
    are refused on it with an error naming the argument, before any compile or launch."""
    from sonic_learn.fast import grouped_gemm as fast

    pp = fast.GemmConfig(kernel="pingpong", tile=PP192)
    assert pp.tile == PP192 and not pp.fused_epilogues and pp.persistent
    assert fast.cluster_size(False, pp) == 1 and fast.cluster_size(False, fast.GemmConfig(
        kernel="pingpong", tile=PP192, cluster_m=2)) == 2
    assert fast.GemmConfig(kernel="ws", tile=PP192).fused_epilogues  # cooperative: 96 accumulators
    assert fast.DEFAULT_CONFIG.fused_epilogues and fast.GemmConfig(kernel="pingpong").fused_epilogues
    for kernel in ("v1", "sm90"):
        with pytest.raises(ValueError, match=rf"kernel '{kernel}' takes tile_n in \(64, 128, 256\)"):
            fast.GemmConfig(kernel=kernel, tile=PP192)
        with pytest.raises(ValueError, match=rf"kernel '{kernel}' takes tile_n in"):
            fast.compile_grouped_gemm("varlen_m", torch.bfloat16, torch.bfloat16, PP192, kernel=kernel)
    for bad in ((128, 96, 64), (128, 192, 48), (128, 192.0, 64)):
        with pytest.raises(ValueError, match="tile"):
            fast.GemmConfig(kernel="pingpong", tile=bad)
    with pytest.raises(ValueError, match="epi_subtile=64 needs tile_n to be a multiple of 128"):
        fast.GemmConfig(tile=PP192, epi_subtile=64)  # three subtiles of 64: not an even number
    with pytest.raises(ValueError, match="epi_subtile=32 needs kernel='ws'"):
        fast.GemmConfig(kernel="pingpong", tile=PP192, epi_subtile=32)
    lean = r"does not run on kernel='pingpong' with tile \(128, 192, 64\).*192 accumulators.*tile_n <= 128"
    for variant, transposed, epilogue in (("varlen_m_gather", False, "swiglu"), ("varlen_m_gather", True, "dswiglu"),
                                          ("varlen_k_gather", True, "store"), ("varlen_k", True, "store")):
        with pytest.raises(ValueError, match=lean):
            fast.compile_grouped_gemm(variant, torch.bfloat16, torch.bfloat16, PP192, kernel="pingpong",
                                      transposed=transposed, epilogue=epilogue)
    # the public functions name the offending argument before looking at the (here CPU) tensors
    x = torch.zeros(4, 16, dtype=torch.bfloat16)
    w = torch.zeros(2, 16, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"the fused epilogue='swiglu' \(fused=True\) " + lean[:15]):
        fast.gather_fused_grouped_gemm_swiglu(x, w, None, config=pp)
    with pytest.raises(ValueError, match=r"the fused epilogue='dswiglu' \(fused=True\)"):
        fast.gather_fused_grouped_gemm_dswiglu(x, w, None, x, x[:, 0].float(), config=pp)
    with pytest.raises(ValueError, match=r"the transposed varlen-K store \(transpose_out=True\)"):
        fast.grouped_gemm_varlen_k(x, x, None, transpose_out=True, config=pp)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):  # unfused: the plain store, allowed
        fast.gather_fused_grouped_gemm_swiglu(x, w, None, fused=False, config=pp)
    with pytest.raises(ValueError, match="a must be a CUDA tensor"):
        fast.grouped_gemm_varlen_k(x, x, None, config=pp)
    # the MoE layer: the plain-store roles (down, dx) take it, the roles that need more refuse it
    assert fast.LayerGemms(down=pp, dx=pp).config("dx") == pp
    for role, needs in (("up", "the fused SwiGLU epilogue"), ("dh", "the fused dH epilogue"),
                        ("dw", "the transposed varlen-K store")):
        with pytest.raises(ValueError, match=rf"LayerGemms.{role}: .* runs the plain store only .* {needs}"):
            fast.LayerGemms(**{role: pp})
    with pytest.raises(ValueError, match="LayerGemms.up"):
        fast.checked_layer_gemms(pp)  # one config for every GEMM of the layer
    assert fast.checked_layer_gemms(fast.GemmConfig(kernel="ws", tile=PP192)).up.tile == PP192


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("variant,transposed,epilogue", [
    ("varlen_m", False, "store"), ("varlen_m_gather", True, "store"), ("varlen_m_gather", False, "swiglu"),
    ("varlen_m_gather", True, "dswiglu"), ("varlen_k_gather", True, "store")])
def test_cooperative_192_compiles_without_spills(variant, transposed, epilogue):
    """The cooperative kernel takes tile_n = 192 too (96 accumulators per MMA thread: every epilogue,
    no spill by ptxas's report); its TMA store sends each warpgroup's 64 rows as 3 bulk stores."""
    ptx, report = _ptxas_report(variant=variant, dtype=torch.bfloat16, out_dtype=torch.bfloat16, tile=PP192,
                                kernel="ws", transposed=transposed, epilogue=epilogue)
    assert report == {"stack": 0, "spill_stores": 0, "spill_loads": 0}, report
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n192k16") == PP192[2] // 16
    if epilogue == "store" and variant.startswith("varlen_m"):
        assert len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.global\.shared", ptx)) == 3


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("kernel", ["v1", "sm90"])  # the ladder's teaching steps
@pytest.mark.parametrize("variant", ["varlen_m_gather", "varlen_k_gather"])
def test_teaching_kernel_compiles_for_sm90a(variant, kernel):
    ptx = _ptx(variant, torch.bfloat16, torch.bfloat16, kernel)
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx
    assert re.search(r"cp\.async\.c[ga]\.shared\.global", ptx)
    assert "cp.async.bulk.tensor" not in ptx


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_transposed_layouts_compile_for_sm90a(variant):
    """K-major weights (varlen-M, w stored (E, N, K)) and the transposed store (varlen-K, (E, N, d)):
    the weights still come through TMA, and the K-major B mode changes the WGMMA instruction's
    B-transpose flag (the last immediate of wgmma.mma_async: 1 = MN-major, 0 = K-major)."""
    from sonic_learn.fast.grouped_gemm import WS_TILE, compile_grouped_gemm

    ptx = compile_grouped_gemm(variant, torch.bfloat16, torch.bfloat16, WS_TILE, keep_ptx=True, kernel="ws",
                               transposed=True).__ptx__
    plain = _ptx(variant, torch.bfloat16, torch.bfloat16, "ws")
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert ptx != plain
    if variant.startswith("varlen_m"):
        b_flags = lambda text: set(re.findall(r"wgmma\.mma_async[^;]*,\s*(\d)\s*;", text))  # noqa: E731
        assert b_flags(ptx) != b_flags(plain), (b_flags(ptx), b_flags(plain))


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
def test_swiglu_epilogue_compiles_for_sm90a():
    """The up-projection with SwiGLU fused in its epilogue: same mainloop, an exp (ex2) in the epilogue."""
    from sonic_learn.fast.grouped_gemm import WS_TILE, compile_grouped_gemm

    ptx = compile_grouped_gemm("varlen_m_gather", torch.bfloat16, torch.bfloat16, WS_TILE, keep_ptx=True,
                               kernel="ws", epilogue="swiglu").__ptx__
    plain = _ptx("varlen_m_gather", torch.bfloat16, torch.bfloat16, "ws")
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert "ex2.approx" in ptx and "ex2.approx" not in plain


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
def test_dswiglu_epilogue_compiles_for_sm90a():
    """The backward's dH kernel: gathered dO, K-major W2 (TMA), dSwiGLU + the quad shuffle for dS."""
    from sonic_learn.fast.grouped_gemm import WS_TILE, compile_grouped_gemm

    ptx = compile_grouped_gemm("varlen_m_gather", torch.bfloat16, torch.bfloat16, WS_TILE, keep_ptx=True,
                               kernel="ws", transposed=True, epilogue="dswiglu").__ptx__
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert "ex2.approx" in ptx and "shfl.sync.bfly" in ptx


def test_fused_epilogue_bad_config():
    from sonic_learn.fast.grouped_gemm import compile_grouped_gemm

    with pytest.raises(ValueError, match="epilogue must be one of"):
        compile_grouped_gemm("varlen_m", torch.bfloat16, torch.bfloat16, kernel="ws", epilogue="gelu")
    with pytest.raises(ValueError, match="needs a varlen-M variant with a 16-bit output"):
        compile_grouped_gemm("varlen_k", torch.bfloat16, torch.bfloat16, kernel="ws", epilogue="swiglu")
    with pytest.raises(ValueError, match="need a persistent kernel"):
        compile_grouped_gemm("varlen_m", torch.bfloat16, torch.bfloat16, kernel="sm90", epilogue="swiglu")


def test_transposed_needs_production_kernel():
    from sonic_learn.fast.grouped_gemm import compile_grouped_gemm

    with pytest.raises(ValueError, match="need a persistent kernel"):
        compile_grouped_gemm("varlen_m", torch.bfloat16, torch.bfloat16, kernel="v1", transposed=True)


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
def test_fp32_output_compiles():
    from sonic_learn.fast.grouped_gemm import compile_grouped_gemm

    ptx = compile_grouped_gemm("varlen_m_gather", torch.bfloat16, torch.float32, (128, 128, 64), keep_ptx=True,
                               kernel="ws").__ptx__
    assert "wgmma.mma_async" in ptx and ".target sm_90a" in ptx


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("epi_subtile", [32, 64])
@pytest.mark.parametrize("variant,out_dtype,cluster_m", [
    ("varlen_m", torch.bfloat16, 1), ("varlen_m_gather", torch.float16, 1), ("varlen_k_gather", torch.bfloat16, 2),
    ("varlen_m_gather", torch.float32, 1)], ids=["varlen_m", "gather_fp16", "varlen_k_c2", "gather_fp32out"])
def test_subtiled_epilogue_compiles_for_sm90a(variant, out_dtype, cluster_m, epi_subtile):
    """GemmConfig(epi_subtile=S): one bulk store per (64, S) subtile (tile_n / S per warpgroup and
    tile), a wait that leaves one bulk store reading (the other buffer's) while the next subtile is
    written, and the masked 16-byte stores of the ragged rows still there."""
    from sonic_learn.fast.grouped_gemm import WS_TILE, compile_grouped_gemm

    tile = WS_TILE if out_dtype != torch.float32 else (128, 128, 64)
    ptx = compile_grouped_gemm(variant, torch.bfloat16 if out_dtype == torch.float32 else out_dtype, out_dtype, tile,
                               keep_ptx=True, kernel="ws", cluster_m=cluster_m, epi_subtile=epi_subtile).__ptx__
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx
    # one bulk store per subtile, or per 128-byte column box of a subtile (TMA's swizzled box width)
    stores = max(tile[1] // epi_subtile, tile[1] * out_dtype.itemsize // 128)
    assert len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.global\.shared", ptx)) == stores
    assert re.search(r"cp\.async\.bulk\.wait_group\.read\s+1;", ptx), "stores of subtile j overlap subtile j+1"
    assert re.search(r"cp\.async\.bulk\.wait_group\.read\s+0;", ptx) and "st.global.v4" in ptx


def _swiglu_ptx(tile, cluster_m=1, epi_subtile=None):
    from sonic_learn.fast.grouped_gemm import compile_grouped_gemm

    return compile_grouped_gemm("varlen_m_gather", torch.bfloat16, torch.bfloat16, tile, keep_ptx=True, kernel="ws",
                                epilogue="swiglu", cluster_m=cluster_m, epi_subtile=epi_subtile).__ptx__


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("tile,epi_subtile,cluster_m", [
    ((128, 256, 64), 32, 1), ((128, 256, 64), 64, 1), ((128, 256, 64), 32, 2), ((128, 128, 64), 32, 1)],
    ids=["256-sub32", "256-sub64", "256-sub32-c2", "128-sub32"])
def test_subtiled_swiglu_epilogue_compiles_for_sm90a(tile, epi_subtile, cluster_m):
    """The SwiGLU epilogue with epi_subtile=S: per (64, S) subtile of H one bulk store to ``out`` and
    one of its (64, S / 2) subtile of A to ``epi_out`` (two more TMA tensor maps than the
    whole-tile kernel, which has no bulk store at all), the overlapping wait, the masked stores of
    the ragged rows, and the freed shared memory as pipeline stages (one "full" and one "empty"
    mbarrier per stage)."""
    from sonic_learn.fast.grouped_gemm.ws import ws_stages

    whole = _swiglu_ptx(tile, cluster_m)
    ptx = _swiglu_ptx(tile, cluster_m, epi_subtile)
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "ex2.approx" in ptx
    bulk_stores = r"cp\.async\.bulk\.tensor\.2d\.global\.shared"
    assert len(re.findall(bulk_stores, whole)) == 0
    assert len(re.findall(bulk_stores, ptx)) == 2 * (tile[1] // epi_subtile)  # H and A per subtile
    tensor_maps = lambda text: text.count(".param .align 64 .b8")  # noqa: E731  (128-byte TMA descriptors)
    assert tensor_maps(ptx) == tensor_maps(whole) + 2
    assert re.search(r"cp\.async\.bulk\.wait_group\.read\s+1;", ptx), "stores of subtile j overlap subtile j+1"
    assert re.search(r"cp\.async\.bulk\.wait_group\.read\s+0;", ptx) and "st.global.v4" in ptx
    stages = ws_stages(tile, 2, epi_subtile=epi_subtile, subtile_outputs=(1, 2))
    extra = stages - ws_stages(tile, 2)
    assert ptx.count("mbarrier.init") - whole.count("mbarrier.init") == 2 * extra


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("variant,transposed,epilogue", [("varlen_m_gather", True, "dswiglu"),
                                                         ("varlen_k_gather", True, "store")])
def test_subtiled_epilogue_ignored_by_dh_and_transposed_stores(variant, transposed, epilogue):
    """The dH epilogue and the transposed varlen-K store keep their whole-tile buffer: with
    epi_subtile they compile to the very same kernel (so one GemmConfig serves every MoE GEMM)."""
    from sonic_learn.fast.grouped_gemm import WS_TILE, compile_grouped_gemm

    def ptx(**extra):
        return compile_grouped_gemm(variant, torch.bfloat16, torch.bfloat16, WS_TILE, keep_ptx=True,
                                    transposed=transposed, epilogue=epilogue, **extra).__ptx__

    assert ptx(epi_subtile=64) == ptx()


PREFETCH_L2 = "cp.async.bulk.prefetch.L2.global"


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("kernel,tile,cluster_m", [("ws", (128, 256, 64), 1), ("pingpong", (128, 128, 64), 2)])
def test_epi_prefetch_adds_one_l2_prefetch_to_the_dh_kernel(kernel, tile, cluster_m):
    """GemmConfig(epi_prefetch=N): the dH kernel's producer issues one bulk L2 prefetch (of one
    tile row of H per thread); without it the kernel has none, and the epilogues that read no input
    (SwiGLU, the plain store) compile to the very same kernel either way."""
    from sonic_learn.fast.grouped_gemm import compile_grouped_gemm

    def ptx(variant, transposed, epilogue, **extra):
        return compile_grouped_gemm(variant, torch.bfloat16, torch.bfloat16, tile, keep_ptx=True, kernel=kernel,
                                    transposed=transposed, epilogue=epilogue, cluster_m=cluster_m, **extra).__ptx__

    with_pf = ptx("varlen_m_gather", True, "dswiglu", epi_prefetch=8)
    assert with_pf.count(PREFETCH_L2) == 1 and ".local" not in with_pf
    assert PREFETCH_L2 not in ptx("varlen_m_gather", True, "dswiglu")
    for variant, transposed, epilogue in (("varlen_m_gather", False, "swiglu"), ("varlen_m", True, "store")):
        assert ptx(variant, transposed, epilogue, epi_prefetch=8) == ptx(variant, transposed, epilogue)


@pytest.mark.parametrize("prefetch", [0, 4, 16])
def test_epi_prefetch_reaches_the_compiler(monkeypatch, prefetch):
    """The config's lead is what the dH kernel is compiled with (the GPU test's bit-equality would
    pass trivially if it were dropped on the way); the GEMMs without an epilogue input get 0, so one
    config serves every role without compiling copies of the same kernel."""
    from sonic_learn.fast import grouped_gemm as gg

    seen = []
    monkeypatch.setattr(gg, "compile_grouped_gemm", lambda *args, **kwargs: seen.append(kwargs) or object())
    for kernel in ("ws", "pingpong"):
        cfg = gg.GemmConfig(kernel=kernel, epi_prefetch=prefetch)
        gg._compiled(cfg, "varlen_m_gather", torch.bfloat16, torch.bfloat16, True, "dswiglu")
        assert seen[-1]["epi_prefetch"] == prefetch and seen[-1]["kernel"] == kernel
        gg._compiled(cfg, "varlen_m_gather", torch.bfloat16, torch.bfloat16, False, "swiglu")
        assert seen[-1]["epi_prefetch"] == 0


def test_epi_prefetch_config_checks():
    from sonic_learn.fast import grouped_gemm as fast

    assert fast.GemmConfig(epi_prefetch=8).epi_prefetch == 8 and fast.DEFAULT_CONFIG.epi_prefetch == 0
    assert fast.GemmConfig(kernel="pingpong", cluster_m=2, epi_prefetch=4).epi_prefetch == 4
    assert fast.GemmConfig(kernel="v1", epi_prefetch=0).epi_prefetch == 0  # off: any kernel
    for bad in (True, -1, 2.0, "8", None):
        with pytest.raises(TypeError, match=r"epi_prefetch must be an int >= 0 .* got"):
            fast.GemmConfig(epi_prefetch=bad)
    for kernel in ("v1", "sm90"):
        with pytest.raises(ValueError, match=f"epi_prefetch=8 needs a persistent kernel .* got kernel='{kernel}'"):
            fast.GemmConfig(kernel=kernel, epi_prefetch=8)
    with pytest.raises(ValueError, match="epi_prefetch=8 needs a persistent kernel"):
        fast.compile_grouped_gemm("varlen_m", torch.bfloat16, torch.bfloat16, kernel="v1", epi_prefetch=8)


def test_subtiled_epilogue_frees_pipeline_stages_and_rejects_bad_values():
    """The stages count the subtiled epilogue's real footprint (two (64, S) buffers per warpgroup
    instead of one padded (64, tile_n) buffer); bad epi_subtile values are named before compiling."""
    from sonic_learn.fast import grouped_gemm as fast
    from sonic_learn.fast.grouped_gemm.ws import ws_stages

    assert ws_stages(fast.WS_TILE, 2) == 3
    assert ws_stages(fast.WS_TILE, 2, epi_subtile=32) == 4
    assert ws_stages(fast.WS_TILE, 2, epi_subtile=64) == 3  # 4 x 48 KB + 32 KB + the expert table: too much
    # SwiGLU: H's buffers and A's half-width ones (1.5x the plain store's)
    swiglu = dict(subtile_outputs=(1, 2))
    assert ws_stages(fast.WS_TILE, 2, epi_subtile=32, **swiglu) == 4  # 24 KB of buffers
    assert ws_stages(fast.WS_TILE, 2, epi_subtile=64, **swiglu) == 3  # 48 KB: no stage gained
    assert ws_stages((128, 128, 64), 2) == 5
    assert ws_stages((128, 128, 64), 2, epi_subtile=32, **swiglu) == 6
    assert ws_stages((128, 128, 64), 2, epi_subtile=64, **swiglu) == 5
    assert ws_stages((128, 128, 32), 2, epi_subtile=64) == 11
    assert ws_stages((128, 128, 32), 2, epi_subtile=64, **swiglu) == 10  # A's buffers cost a stage here
    assert fast.GemmConfig(epi_subtile=64).epi_subtile == 64 and fast.DEFAULT_CONFIG.epi_subtile is None
    for bad in (48, 0, True, "64"):
        with pytest.raises(ValueError, match="epi_subtile must be None or one of"):
            fast.GemmConfig(epi_subtile=bad)
    with pytest.raises(ValueError, match="epi_subtile=64 needs kernel='ws' with tma_store=True"):
        fast.GemmConfig(kernel="pingpong", epi_subtile=64)
    with pytest.raises(ValueError, match="epi_subtile=32 needs kernel='ws' with tma_store=True"):
        fast.GemmConfig(tma_store=False, epi_subtile=32)
    with pytest.raises(ValueError, match="epi_subtile=64 needs tile_n to be a multiple of 128"):
        fast.GemmConfig(tile=(128, 64, 64), epi_subtile=64)
    with pytest.raises(ValueError, match="epi_subtile=64 leaves room for 3 pipeline stages, got stages=4"):
        fast.compile_grouped_gemm("varlen_m", torch.bfloat16, torch.bfloat16, fast.WS_TILE, 4, epi_subtile=64)
    with pytest.raises(ValueError, match="epi_subtile=32 leaves room for 4 pipeline stages, got stages=5"):
        fast.compile_grouped_gemm("varlen_m_gather", torch.bfloat16, torch.bfloat16, fast.WS_TILE, 5,
                                  epilogue="swiglu", epi_subtile=32)


def test_cpu_tensor_rejected_before_launch():
    from sonic_learn.fast import grouped_gemm as fast

    x = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.randn(2, 16, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        fast.gather_fused_grouped_gemm(x, w, None)
    with pytest.raises(ValueError, match="a must be a CUDA tensor"):
        fast.grouped_gemm_varlen_k(x, x, None)


def test_gemm_config_rejects_bad_values():
    import dataclasses

    from sonic_learn.fast import grouped_gemm as fast

    with pytest.raises(ValueError, match="kernel must be one of"):
        fast.GemmConfig(kernel="v2")
    with pytest.raises(ValueError, match="tile must be"):
        fast.GemmConfig(tile=(64, 128, 64))
    with pytest.raises(ValueError, match="3 <= stages"):
        fast.GemmConfig(kernel="v1", tile=fast.TILE, stages=2)
    with pytest.raises(TypeError, match="stages must be an int"):
        fast.GemmConfig(stages="4")
    with pytest.raises(ValueError, match="max_ctas"):
        fast.GemmConfig(max_ctas=0)
    with pytest.raises(ValueError, match=r"whole tile in one warpgroup: tile_n in \(64, 128, 192\)"):
        fast.GemmConfig(kernel="pingpong", tile=fast.WS_TILE)
    with pytest.raises(TypeError, match="tma_store"):
        fast.GemmConfig(tma_store=0)
    with pytest.raises(ValueError, match="cluster_m must be one of"):
        fast.GemmConfig(cluster_m=4)
    with pytest.raises(ValueError, match="cluster_m must be one of"):
        fast.GemmConfig(cluster_m=True)
    with pytest.raises(ValueError, match="cluster_m must be one of"):
        fast.compile_grouped_gemm("varlen_m", torch.bfloat16, torch.bfloat16, fast.WS_TILE, cluster_m=3)
    for kernel in ("v1", "sm90"):  # one CTA per tile: no clusters
        with pytest.raises(ValueError, match=f"cluster_m=2 needs a persistent kernel .* got '{kernel}'"):
            fast.GemmConfig(kernel=kernel, cluster_m=2)
        with pytest.raises(ValueError, match="cluster_m=2 needs a persistent kernel"):
            fast.compile_grouped_gemm("varlen_m", torch.bfloat16, torch.bfloat16, fast.TILE, kernel=kernel,
                                      cluster_m=2)
    # ping-pong in clusters of 2 on request; by default alone, for varlen-M and varlen-K (opt-in)
    pingpong_pair = fast.GemmConfig(kernel="pingpong", cluster_m=2)
    assert fast.cluster_size(False, pingpong_pair) == fast.cluster_size(True, pingpong_pair) == 2
    assert fast.cluster_size(False, fast.GemmConfig(kernel="pingpong")) == 1
    assert fast.cluster_size(True, fast.GemmConfig(kernel="pingpong")) == 1
    assert fast.cluster_size(False) == 1 and fast.cluster_size(True) == 2  # the production default's rule
    # immutable, and the default is the production kernel with its own tile
    assert fast.DEFAULT_CONFIG == fast.GemmConfig(kernel="ws", tile=fast.WS_TILE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.DEFAULT_CONFIG.kernel = "v1"
    assert fast.GemmConfig(kernel="v1").tile == fast.TILE and fast.GemmConfig(kernel="pingpong").tile == (128, 128, 64)
    # a config of the wrong type is named before any other check or launch
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="config must be a sonic_learn.fast.grouped_gemm.GemmConfig"):
        fast.gather_fused_grouped_gemm(x, x[None], None, config="ws")
    with pytest.raises(TypeError, match="config must be"):
        fast.grouped_gemm_varlen_k(x, x, None, config={"kernel": "ws"})


def test_ladder_steps_and_main_without_a_gpu(capsys):
    """Every kernel of the ladder says in one line what it adds; ``python -m
    sonic_learn.fast.grouped_gemm`` refuses to run without a Hopper GPU, naming why."""
    from sonic_learn.fast import grouped_gemm as fast
    from sonic_learn.fast.grouped_gemm.__main__ import main

    assert tuple(fast.STEPS) == fast.KERNELS == ("v1", "sm90", "ws", "pingpong")
    assert all(isinstance(v, str) and v for v in fast.STEPS.values())
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the ladder's run is a gpu test")
    assert main(["--T", "64"]) == 2
    assert "needs a Hopper GPU" in capsys.readouterr().err
