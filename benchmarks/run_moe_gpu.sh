#!/usr/bin/env bash
# One GPU session for issue 7: the fast MoE GPU tests, then (unless SKIP_BENCH=1) the benchmark.
source "$(dirname "$0")/gpu_common.sh" moe-out
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_fast_moe.py ${PYTEST_ARGS:-} 2>&1 | tail -60 | tee "$OUT/pytest.log"
[ "${SKIP_BENCH:-0}" = 1 ] || timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/moe.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tail -40 | tee "$OUT/bench.log"
