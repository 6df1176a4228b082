#!/usr/bin/env bash
# One GPU session for issue 6: property tests, then the benchmark (JSON under $OUT).
source "$(dirname "$0")/gpu_common.sh" grouped-gemm-out
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -x -q -p no:cacheprovider tests/test_fast_grouped_gemm.py ${PYTEST_ARGS:-} 2>&1 | tail -40 | tee "$OUT/pytest.log"
[ "${SKIP_BENCH:-0}" = 1 ] || python3 benchmarks/grouped_gemm.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tail -60 | tee "$OUT/bench.log"
