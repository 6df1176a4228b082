#!/usr/bin/env bash
# One GPU session for issue 5: a quick agreement smoke check, the property tests, then the
# benchmark (logs and JSON under $OUT). SKIP_TESTS=1 / SKIP_BENCH=1 skip a step.
source "$(dirname "$0")/gpu_common.sh" topk-out
python3 - <<'EOF' 2>&1 | tee "$OUT/smoke.log"
import sys, time, torch
from sonic_learn.fast import topk as fast
failures = 0
bf, fp, f32 = torch.bfloat16, torch.float16, torch.float32
cases = [("bitonic", bf, n, k) for n, k in ((8, 8), (128, 8), (200, 3), (512, 10), (4096, 16))]
cases += [("bitonic", fp, 128, 8), ("bitonic", fp, 200, 3), ("bitonic", f32, 64, 16), ("bitonic", f32, 512, 10)]
cases += [("radix", bf, n, k) for n, k in ((8, 8), (128, 8), (200, 3), (4096, 16))]
cases += [("radix", fp, 128, 8), ("radix", f32, 64, 16), ("radix", f32, 512, 10)]
for kind, dtype, n, k in cases:
    x = (torch.randint(-4, 5, (3000, n), device="cuda") * 0.5).to(dtype)
    t0 = time.time()
    try:
        v, i = getattr(fast, f"{kind}_topk")(x, k)
        torch.cuda.synchronize()
    except Exception as e:  # report and go on with the other cases
        failures += 1
        print(f"{kind:7s} {str(dtype):15s} N={n:5d} k={k:2d} ERROR {e!r}"[:2000])
        continue
    c = torch.where(x == 0, torch.zeros_like(x), x)
    want = torch.sort(c, dim=-1, descending=True, stable=True).indices[:, :k]
    bad = (i != want).any(-1)
    failures += int(bad.any()) + int(not torch.equal(v, x.gather(-1, i)))
    print(f"{kind:7s} {str(dtype):15s} N={n:5d} k={k:2d} first call {time.time() - t0:5.2f}s "
          f"rows wrong {int(bad.sum())}/{x.shape[0]} values==gather {torch.equal(v, x.gather(-1, i))}"
          + ("" if not bad.any() else f" e.g. got {i[bad][0].tolist()} want {want[bad][0].tolist()}"))
sys.exit(1 if failures else 0)
EOF
[ $? = 0 ] || { echo "smoke check failed: skipping tests and benchmark"; exit 1; }
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_fast_topk.py ${PYTEST_ARGS:-} 2>&1 | tail -60 | tee "$OUT/pytest.log"
fi
[ "${SKIP_BENCH:-0}" = 1 ] || python3 benchmarks/topk.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tail -30 | tee "$OUT/bench.log"
