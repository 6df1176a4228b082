#!/usr/bin/env bash
# One GPU session for issue 8: a quick agreement smoke check, the benchmark, then the property
# tests (logs and JSON under $OUT). SKIP_TESTS=1 / SKIP_BENCH=1 skip a step.
source "$(dirname "$0")/gpu_common.sh" routing-out
python3 - <<'PY' 2>&1 | tee "$OUT/smoke.log"
import sys, time, torch
from sonic_learn.fast import routing as fast
from sonic_learn.reference import routing as ref
fails = 0
def cmp(name, got, want, fields):
    global fails
    for f in fields:
        g, w = getattr(got, f), getattr(want, f)
        if g.shape != w.shape or not torch.equal(g, w):
            fails += 1
            idx = (g != w).nonzero()[:3].flatten().tolist() if g.shape == w.shape else "shape"
            print(f"  {name}.{f} MISMATCH shapes {tuple(g.shape)} {tuple(w.shape)} first {idx}")
            if g.shape == w.shape and g.numel() < 50: print("   got", g.tolist(), "\n   want", w.tolist())
META = ("expert_counts", "expert_offsets", "gather_idx", "pair_of_row", "row_of_pair")
ROUT = ("token_idx", "expert_idx", "scores")
for T, E, K in ((5, 3, 2), (100, 8, 2), (3000, 64, 8), (24576, 128, 8), (70000, 512, 4)):
    x = torch.randn(T, E, device="cuda").bfloat16()
    t0 = time.time()
    try:
        tc_ref = ref.topk_routing(x, K); tc = fast.topk_routing(x, K)
        cmp(f"T{T}E{E}K{K} topk", tc, tc_ref, ROUT)
        cmp(f"T{T}E{E}K{K} meta", fast.build_metadata(tc_ref), ref.build_metadata(tc_ref), META)
        for mode in ("nearest", "up", "down", "stochastic"):
            g1 = torch.Generator(device="cuda").manual_seed(1); g2 = torch.Generator(device="cuda").manual_seed(1)
            cmp(f"T{T}E{E}K{K} tr-{mode}", fast.token_rounding(x, K, tile_m=16, mode=mode, generator=g1),
                ref.token_rounding(x, K, tile_m=16, mode=mode, generator=g2), ROUT)
        torch.cuda.synchronize()
    except Exception as e:
        fails += 1; print(f"T{T} E{E} K{K} ERROR {e!r}"[:3000]); continue
    print(f"T={T} E={E} K={K} checked in {time.time() - t0:.1f}s, failures so far {fails}")
sys.exit(1 if fails else 0)
PY
smoke=$?
if [ $smoke = 0 ] && [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout 150 python3 benchmarks/routing.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tail -40 | tee "$OUT/bench.log"
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  X=""; [ $smoke = 0 ] || X="-x"
  timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider $X tests/test_fast_routing.py ${PYTEST_ARGS:-} 2>&1 | tail -60 | tee "$OUT/pytest.log"
fi
if [ "${PROFILE:-0}" = 1 ]; then
python3 - <<'PY' 2>&1 | tee "$OUT/profile.log"
# Where the time of fast token_rounding + build_metadata goes (7B configuration, bf16 logits).
import torch
from torch.profiler import ProfilerActivity, profile
from sonic_learn.fast import routing as fast
x = torch.randn(24576, 128, device="cuda").bfloat16()
def run():
    r = fast.token_rounding(x, 8, tile_m=128, mode="nearest", check_finite=False)
    return fast.build_metadata(r, check_ids=False)
for _ in range(3): run()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5): run()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
# Kernel time alone (sum of CUDA kernel time per call) vs wall time, for both pipelines.
import time
def topk_meta():
    return fast.build_metadata(fast.topk_routing(x, 8, check_finite=False), check_ids=False)
for name, fn in (("topk_routing+build_metadata", topk_meta), ("token_rounding+build_metadata", run)):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p2:
        for _ in range(10): fn()
        torch.cuda.synchronize()
    kern = sum(e.self_device_time_total for e in p2.key_averages()) / 10
    t0 = time.perf_counter()
    for _ in range(50): fn()
    torch.cuda.synchronize()
    print(f"{name}: GPU kernel time {kern:.1f} us per call, wall {(time.perf_counter() - t0) / 50 * 1e6:.1f} us per call")
PY
fi
