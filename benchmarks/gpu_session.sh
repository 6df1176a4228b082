#!/usr/bin/env bash
# One GPU lease, every measurement in a row: the whole `gpu` test suite, the expert-parallel
# benchmark at the GPU count of the machine, the side-by-side with upstream sonic-moe, the tiny
# MoE language model under both routings, the token-rounding layer benchmark, the compare CLI's
# upstream row and the memory breakdown. Each step has its own time limit and writes under $GS
# (default /tmp/gs): logs in $GS/*.log, JSON/text results in $GS/results/. A step that fails or
# times out is logged and the next one runs.
#
# Needs this project's CuTe-DSL staged by ../shared/gpu/pack (/tmp/gpu-wheels/env.sh), or both
# sites by ../shared/gpu/pack-with-upstream (/tmp/stage/env.sh, /tmp/stage/env_up.sh: the steps
# against upstream run only then). That script's 60 MiB parts plus this checkout's ~8.5 MiB exceed
# the 64 MiB one device call may carry: pack smaller parts (then 4 staging runs, p1 .. p4) with
#   sed 's/-b 60m/-b 52m/' ../shared/gpu/pack-with-upstream > /tmp/pwu.sh && bash /tmp/pwu.sh
# Long runs go past one device call's limit, so start it in its own session and poll:
#   setsid nohup bash benchmarks/gpu_session.sh > /tmp/gs.log 2>&1 < /dev/null &
# (setsid matters: a plain `cmd &` dies with the device call that started it). Poll with
# `tail /tmp/gs.log`; to wait for the end, test for the line "== all done", not `pgrep -f
# gpu_session.sh` (that also matches the polling command's own shell).
# SKIP="tests ep ..." leaves steps out (names: tests tests_rest train memory token_rounding layer_ab_7b layer_ab_30b ab_tree<i>_<dir>
# vs_upstream compare ncu_step_ours ncu_step_upstream ep tiles vs_upstream_more ncu_dh_topk_base ncu_dh_topk_none ncu_dh_token_rounding_base
# ncu_dh_token_rounding_none dh_layout; upstream's warm-up runs whenever upstream is staged).
# LAYER_AB=<comma list of benchmarks/moe.py --gemm entries> replaces the layer A/B's configs;
# AB_TREES="<dir> <dir> ..." adds an A/B of source trees (see the step; AB_CONFIGS, default 7b,30b,e256);
# VS_GEMM / VS_ROUNDS / VS_CONFIGS: the side-by-side's extra GEMM-config rows, rounds and configs.
# BEFORE=<another fast/moe.py> adds the memory step's before/after of the layer's glue. TESTS=<pytest
# paths> replaces the kernel-test step's files (tests_rest runs every other `gpu` test).
set -u -o pipefail
cd "$(dirname "$0")/.."
GS=${GS:-/tmp/gs}
mkdir -p "$GS/results"
# a carried file is gone from the checkout after the next device call: keep our own copy now
[ -n "${BEFORE:-}" ] && cp "$BEFORE" "$GS/moe_before.py"
if [ -f /tmp/stage/env_up.sh ]; then  # both sites (pack-with-upstream)
  source /tmp/stage/env.sh
  export SONIC_UPSTREAM_SITE=$(env -u PYTHONPATH bash -c 'source /tmp/stage/env_up.sh; echo "$PYTHONPATH"')
else  # this project's site only (../shared/gpu/pack): the steps that need upstream are skipped
  source /tmp/gpu-wheels/env.sh
  SKIP="${SKIP:-} vs_upstream compare vs_upstream_more"
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=gpu NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$GS/results/device.txt"
python3 -c "import torch, cutlass; print('torch', torch.__version__, 'cutlass-dsl', cutlass.__version__)" \
  | tee -a "$GS/results/device.txt"

step() {  # step NAME SECONDS CMD...: run unless skipped, with a time limit, log and status
  local name=$1 limit=$2; shift 2
  case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped"; return;; esac
  echo "== $name: start $(date +%T) (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$GS/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0))s"
  tail -6 "$GS/$name.log"
}

# 1. The tests, alone on the machine: the kernels JIT-compile on the CPU, and sharing it with
#    upstream's first compile made the whole suite miss its limit (H100, 2026-12-07). The kernel
#    tests come first, one line per test (-v), so a cut-off run still says what passed. Their
#    limit is generous: on an H100 (2026-12-07) test_fast_grouped_gemm.py alone took 360 s,
#    test_fast_moe.py + test_fast_ops.py 90-120 s, and the routing, token-rounding and fused-glue
#    files 60-105 s. The machine is released after ~30 s
#    without a device call, so poll with calls that sleep inside (e.g. a loop of `sleep 10` for up
#    to a few minutes), issued back to back.
FAST_TESTS="tests/test_fast_ops.py tests/test_fast_moe.py tests/test_token_rounding.py tests/test_fast_routing.py
  tests/test_fast_topk.py tests/test_fast_grouped_gemm.py tests/test_integrations_hf.py
  tests/test_moe_module_backend_checks.py tests/test_fast_ladders.py tests/test_reference_routing.py
  tests/test_fast_grouped_gemm_compile.py"
# The kernel tests' time is mostly the kernels' JIT compile, on the CPU and one process at a time:
# pytest-xdist (on the GPU image) spreads the test files' compiles over TEST_WORKERS processes that
# share the GPU (TEST_WORKERS=0: one process). Correctness tests only: nothing here is timed.
step tests 900 python3 -m pytest -v -rfE -p no:cacheprovider -n "${TEST_WORKERS:-8}" -m gpu ${TESTS:-$FAST_TESTS}
step tests_rest 300 python3 -m pytest -v -rfE -p no:cacheprovider -m gpu tests/ \
  $(for f in $FAST_TESTS; do echo "--ignore=$f"; done) --deselect tests/test_parallel.py::test_a_hang_fails_instead_of_blocking

# 2. Upstream's first call JIT-compiles for minutes (CPU work): start it now, so that its kernels are
#    in CuTe-DSL's file cache when the timed side-by-side runs, and meanwhile run what does not
#    compare against it: the training runs (losses, not times), the memory breakdown (bytes) and
#    our own timings (medians; the warm-up uses the GPU only for one call per config).
( [ -n "${SONIC_UPSTREAM_SITE:-}" ] && timeout 900 python3 benchmarks/vs_upstream.py --skip sonic_learn,grouped_mm \
    --reps 1 --warmup 1 --configs 7b,30b,e256 --out "$GS/warm" --upstream-timeout 880 > "$GS/upstream_warmup.log" 2>&1
  echo "upstream warm-up exit $?" >> "$GS/upstream_warmup.log" ) &
warm=$!
step train 600 python3 benchmarks/train_tiny_moe.py --out "$GS/results" --seeds 0,1 --steps 300
# the layer before (BEFORE=path of another fast/moe.py, copied above) and after, same process;
# alive-at-peak; profile
step memory 240 python3 benchmarks/moe_memory.py --configs 7b --profile ${BEFORE:+--before "$GS/moe_before.py"} \
  --out "$GS/results"
step token_rounding 420 python3 benchmarks/token_rounding.py --out "$GS/results" --reps 6 --big-reps 3 --breakdown
# A/B of grouped-GEMM configs on the whole reduced-memory layer (one process per model config): the
# default kernels called directly (the reference row for the others), per-role assignments
# (LayerGemms: ping-pong for the fused epilogues, subtiled TMA stores for the short-K GEMMs), and
# the default again last (drift between rows).
AB_DEFAULT="ws:128x256x64:auto,up/dh=pingpong:128x128x64:auto,up/dh/down/dx=pingpong:128x128x64:auto"
AB_DEFAULT+=",down/dx=ws:128x256x64:auto:sub32,ws:128x256x64:auto:sub32"
AB_DEFAULT+=",up/dh=pingpong:128x128x64:auto+down/dx=ws:128x256x64:auto:sub32,up=ws:128x256x64:auto"
# the dH GEMM with its input H prefetched into L2 during the mainloop (GemmConfig.epi_prefetch), on
# the cooperative kernel and on upstream's ping-pong-in-clusters configuration
AB_DEFAULT+=",dh=ws:128x256x64:auto:pf,dh=pingpong:128x128x64:auto:c2,dh=pingpong:128x128x64:auto:c2:pf"
for cfg in 7b 30b; do
  step "layer_ab_$cfg" 400 python3 benchmarks/moe.py --configs "$cfg" --no-naive --no-breakdown --rows reduced \
    --gemm "${LAYER_AB:-$AB_DEFAULT}" --out "$GS/results/layer_ab_$cfg"
done
# A/B of source trees (kernel changes, where a GEMM config cannot express the difference): AB_TREES
# names folders that each hold a copy of sonic_learn/ and benchmarks/ (made here before the run, e.g.
# `git archive main sonic_learn benchmarks pyproject.toml | tar -x -C ab_main`; untracked folders
# travel with the working tree), plus "." for this checkout. One process per tree, in the order
# given (list a tree twice to see the drift), the reduced-memory layer and its per-kernel breakdown.
# A carried folder is gone after the next device call: the trees are copied first.
if [ -n "${AB_TREES:-}" ]; then
  i=0
  for tree in $AB_TREES; do
    i=$((i + 1)); name="tree${i}_$(basename "$(cd "$tree" && pwd)")"; dest="$GS/trees/$name"
    rm -rf "$dest" && mkdir -p "$dest" && cp -r "$tree/sonic_learn" "$tree/benchmarks" "$dest/"
    step "ab_$name" 400 env PYTHONPATH="$dest:$PYTHONPATH" python3 "$dest/benchmarks/moe.py" \
      --configs "${AB_CONFIGS:-7b,30b,e256}" --no-naive --rows reduced --out "$GS/results/ab_$name"
  done
fi

# 3. Against upstream, once its warm-up is done.
echo "== waiting for the upstream warm-up $(date +%T)"; wait $warm; tail -3 "$GS/upstream_warmup.log"
# VS_GEMM=<comma list of --gemm entries>: our layer on those GEMM configs too, as extra rows in the
# same run (VS_ROUNDS rounds taking our rows in turn, default 3 when VS_GEMM is given). --kernels: each
# row's device time per kernel over one forward + backward (upstream's profiled in its own process).
step vs_upstream 560 python3 benchmarks/vs_upstream.py --configs "${VS_CONFIGS:-7b,30b,e256}" --out "$GS/results" \
  --upstream-timeout 500 --kernels ${VS_GEMM:+--gemm "$VS_GEMM" --rounds "${VS_ROUNDS:-3}"}
step compare 240 python3 -m sonic_learn.compare moe --config 7B --reps 5 --json "$GS/results/compare_moe_7B.json"
# Nsight Compute on every kernel of one forward + backward step of each layer at the 7B shape, at
# free clocks: our dH kernel and upstream's side by side (DRAM / L2 throughput, the memory tables,
# the stall reasons). layer_kernels.py --profile-last brackets the step with cudaProfilerStart/Stop,
# so autograd's backward kernels are in it; upstream's layer runs in its own process on its site.
NCU_STEP="ncu --profile-from-start off --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
  --section WarpStateStats"
step ncu_step_ours 420 $NCU_STEP python3 benchmarks/layer_kernels.py --shape 24576,1536,256,128,8 --routings topk \
  --profile-last
if [ -n "${SONIC_UPSTREAM_SITE:-}" ]; then
  step ncu_step_upstream 420 env PYTHONPATH="$SONIC_UPSTREAM_SITE:$PWD" $NCU_STEP python3 benchmarks/layer_kernels.py \
    --impl upstream --shape 24576,1536,256,128,8 --profile-last
fi

# 4. The rest, as time allows.
step ep 150 torchrun --nproc-per-node "$(nvidia-smi -L | wc -l)" benchmarks/expert_parallel.py --configs 7b,30b \
  --chunks 1,2,4 --out "$GS/results/expert_parallel.json"
step tiles 240 python3 benchmarks/grouped_gemm_tiles.py --shapes 7b-up,7b-down,30b-up,30b-down \
  --configs ws:128x256x64:auto,ws:128x256x64:auto:sub32,ws:128x256x64:auto:sub64,pingpong:128x128x64:auto \
  --out "$GS/results/tiles"
step vs_upstream_more 560 python3 benchmarks/vs_upstream.py --configs 1.4b,120b --out "$GS/results/more" \
  --upstream-timeout 500
# Why is the fused dH GEMM slower under token rounding than under top-k at E = 32 and 64, K = 2 (388 vs
# 365 us on an H100, 2026-12-07)? Nsight Compute on that kernel, the second step of each routing (the
# backward runs on autograd's thread, outside the script's NVTX ranges: pick the launch instead), at
# the locked base clock and at free clocks.
for routing in topk token_rounding; do
  for clocks in base none; do
    step "ncu_dh_${routing}_$clocks" 240 ncu --clock-control "$clocks" --kernel-name regex:DSwiGLU --launch-skip 1 \
      --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats \
      --section WarpStateStats python3 benchmarks/layer_kernels.py --shape 16384,1536,1024,32,2 --routings "$routing"
  done
done
# The same question from the routing's side: the dH GEMM under routings that differ in one thing at a
# time (benchmarks/dh_layout.py; rows 1-7 ran on an H100 in session 10, the shifted rows 8 not yet), on
# the default cooperative kernel and on the ping-pong kernel (does overlapping one warpgroup's epilogue
# with the other's MMAs remove the slowdown of uniform full tiles?), and both with H prefetched into L2
# during the mainloop (":pfN", GemmConfig.epi_prefetch = N k-tiles of lead, 4, 8 and 16: does an epilogue that finds H in L2?).
step dh_layout 300 python3 benchmarks/dh_layout.py --out "$GS/results" \
  --dh-configs pingpong:128x128x64:auto,pingpong:128x128x64:auto:c2,ws:128x256x64:auto:pf4,ws:128x256x64:auto:pf,ws:128x256x64:auto:pf16,pingpong:128x128x64:auto:c2:pf
echo "== all done $(date +%T)"
