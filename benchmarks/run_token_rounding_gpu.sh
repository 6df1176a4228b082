#!/usr/bin/env bash
# One GPU session for issue 8's layer benchmark: token rounding vs top-k in the fast MoE layer (the
# paper's six shapes) and the router's share of the 7B forward (log and JSON under $OUT).
# BENCH_ARGS passes options to benchmarks/token_rounding.py (e.g. "--reps 10 --big-reps 5").
source "$(dirname "$0")/gpu_common.sh" token-rounding-out
python3 -c "import torch, cutlass; print('torch', torch.__version__, 'cutlass-dsl', cutlass.__version__)" | tee -a "$OUT/device.txt"
timeout ${BENCH_TIMEOUT:-330} python3 benchmarks/token_rounding.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
