#!/usr/bin/env bash
# One GPU session for token rounding: its GPU tests (sync-free padded router, CUDA-graph capture of a
# training step, no host sync, poisoned allocator), the tiny MoE language model trained with top-k
# and token rounding (benchmarks/train_tiny_moe.py), and the layer benchmark on the paper's six
# shapes plus the router's share of the 7B forward (benchmarks/token_rounding.py). Logs and JSON
# under $OUT. BENCH_ARGS passes options to token_rounding.py (default "--reps 10 --big-reps 5"),
# TRAIN_ARGS to train_tiny_moe.py (default "--steps 300").
source "$(dirname "$0")/gpu_common.sh" token-rounding-out
python3 -c "import torch, cutlass; print('torch', torch.__version__, 'cutlass-dsl', cutlass.__version__)" | tee -a "$OUT/device.txt"
timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_token_rounding.py tests/test_fused_router_glue.py \
  tests/test_fast_moe.py::test_no_host_sync tests/test_fast_moe.py::test_cuda_graph_capture_and_replay \
  tests/test_fast_moe.py::test_token_rounding_padding_rows_are_never_read \
  tests/test_fast_moe.py::test_layer_token_rounding_matches_oracle 2>&1 | tee "$OUT/gpu_tests.log"
timeout ${TRAIN_TIMEOUT:-240} python3 benchmarks/train_tiny_moe.py --out "$OUT" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.log"
timeout ${BENCH_TIMEOUT:-330} python3 benchmarks/token_rounding.py --out "$OUT" ${BENCH_ARGS:---reps 10 --big-reps 5} 2>&1 | tee "$OUT/bench.log"
