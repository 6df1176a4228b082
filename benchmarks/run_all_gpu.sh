#!/usr/bin/env bash
# The whole GPU check of sonic_learn in one or two device runs (see docs "Benchmarks"):
#   STEP=tests  every test marked `gpu` (Hypothesis profile "gpu"), log under $OUT
#   STEP=bench  the MoE layer benchmark and the compare CLI's JSON for the tour
# Usage on the GPU machine (after the CuTe-DSL wheels are staged):
#   STEP=tests bash benchmarks/run_all_gpu.sh ; STEP=bench bash benchmarks/run_all_gpu.sh
source "$(dirname "$0")/gpu_common.sh" sonic-learn-gpu
python3 -c "import torch, cutlass; print('torch', torch.__version__, 'cutlass-dsl', cutlass.__version__)" | tee -a "$OUT/device.txt"
case "${STEP:-tests}" in
  tests)
    timeout ${TEST_TIMEOUT:-500} python3 -m pytest -q -p no:cacheprovider -m gpu tests/ ${PYTEST_ARGS:-} \
      > "$OUT/gpu_tests.log" 2>&1
    echo "pytest exit code $?" | tee -a "$OUT/gpu_tests.log"
    grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -15
    ;;
  bench)
    timeout ${BENCH_TIMEOUT:-360} python3 benchmarks/moe.py --out "$OUT" --naive-reps 2 ${BENCH_ARGS:-} \
      > "$OUT/moe_bench.log" 2>&1; echo "moe bench exit code $?"; tail -25 "$OUT/moe_bench.log"
    timeout 150 python3 -m sonic_learn.compare --json "$OUT/compare_tour.json" > "$OUT/compare_tour.txt" 2>&1
    echo "compare tour exit code $?"; tail -40 "$OUT/compare_tour.txt"
    ;;
esac
