#!/usr/bin/env bash
# The GPU checks that land branch verify11 (session 11): its kernels have only compiled. In priority
# order, each step with its own time limit, every log and result written under $OUT (or $GS), so a
# call cut off at its limit still returns what finished. One device call holds ~600 s: run it as
#   STEPS="tests planted" bash benchmarks/gpu_verify_branch.sh     (first call, ~8 min on an H100)
#   STEPS="pf_ab" ..., then STEPS="tr" ..., then STEPS="layer_ab" ...  (one call each)
# after staging CuTe-DSL (../shared/gpu/pack; /tmp/gpu-wheels/env.sh).
#   tests    the new GPU tests: the dH kernel with and without epi_prefetch (bit for bit), the fused
#            router glue (pair weights from the write kernel; ScoresBackwardKernel vs float64); and
#            every layer and op test (GatherSum's grouped loads run in every layer), token rounding
#   planted  ScoresBackwardKernel with dot_p dropped (a copy of the tree in gpu_planted/): the
#            float64 test must fail
#   pf_ab    the dH GEMM under each routing of dh_layout.py, default vs epi_prefetch with leads of 4, 8
#            and 16 k-tiles, and upstream's ping-pong-in-clusters dH with and without (E = 32 and 7B)
#   tr       the token-rounding benchmark (layer, experts, router share) on this tree, its layer also
#            on the dH epilogue prefetch and on the subtiled TMA-store epilogues (--gemm: the
#            token-rounding / top-k ratio under each), then on the previous tree in gpu_before/
#            (--layer-only) in the same call: the same-run A/B
#   layer_ab the 7B layer with the dH GEMM on epi_prefetch, and with the subtiled TMA-store epilogues
#            (sub32: 5.5% faster 7B forward in session 8, but that run's 30B / E = 256 rows were too
#            noisy to judge), vs the default (benchmarks/moe.py --gemm), then the same layer rows on
#            the previous tree in gpu_before/ (GatherSum's grouped loads: same call, same GPU)
set -u -o pipefail
cd "$(dirname "$0")/.."
GS=${OUT:-${GS:-/tmp/gs}}; mkdir -p "$GS/new" "$GS/old" "$GS/dh_e32" "$GS/dh_7b" "$GS/layer_ab"
source /tmp/gpu-wheels/env.sh
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=gpu NCCL_NVLS_ENABLE=0
BASE=$PYTHONPATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$GS/device.txt"
python3 -c "import torch, cutlass; print('torch', torch.__version__, 'cutlass-dsl', cutlass.__version__)" | tee -a "$GS/device.txt"
step() { local name=$1 limit=$2; shift 2
  echo "== $name: start $(date +%T) (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@" > "$GS/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0))s"; tail -3 "$GS/$name.log"; }
NEW="env PYTHONPATH=$PWD:$BASE"
PF="ws:128x256x64:auto:pf4,ws:128x256x64:auto:pf,ws:128x256x64:auto:pf16,pingpong:128x128x64:auto:c2"
PF+=",pingpong:128x128x64:auto:c2:pf"
for s in ${STEPS:-tests planted pf_ab tr layer_ab}; do case $s in
tests) step tests 420 $NEW python3 -m pytest -v -rfE -p no:cacheprovider -m gpu tests/test_fused_router_glue.py \
    "tests/test_fast_grouped_gemm.py::test_epi_prefetch_changes_no_bit_of_the_dh_kernel" \
    tests/test_fast_moe.py tests/test_fast_ops.py tests/test_token_rounding.py ;;
planted) [ -d gpu_planted ] && step planted 150 bash -c "cd gpu_planted && grep -q PLANTED sonic_learn/fast/routing.py \
    && env PYTHONPATH=$PWD/gpu_planted:$BASE python3 -m pytest -q -rfE -p no:cacheprovider -m gpu \
    ../tests/test_fused_router_glue.py -k 'scores_backward_kernel and 24576'" ;;
pf_ab) step dh_e32 200 $NEW python3 benchmarks/dh_layout.py --out "$GS/dh_e32" --dh-configs "$PF"
    step dh_7b 200 $NEW python3 benchmarks/dh_layout.py --out "$GS/dh_7b" --shape 24576,1536,256,128,8 --shifts 64 \
      --dh-configs "$PF" ;;
tr) step tr_new 330 $NEW python3 benchmarks/token_rounding.py --out "$GS/new" --reps 6 --big-reps 3 --breakdown \
      --gemm "dh=ws:128x256x64:auto:pf,ws:128x256x64:auto:sub32"
    [ -d gpu_before ] && step tr_old 150 bash -c "cd gpu_before && env PYTHONPATH=$PWD/gpu_before:$BASE \
      python3 benchmarks/token_rounding.py --out $GS/old --reps 6 --big-reps 3 --layer-only" ;;
layer_ab) step layer_ab 300 $NEW python3 benchmarks/moe.py --configs 7b --no-naive --no-breakdown --rows reduced \
    --gemm "ws:128x256x64:auto,dh=ws:128x256x64:auto:pf,dh=pingpong:128x128x64:auto:c2:pf,ws:128x256x64:auto:sub32,up=ws:128x256x64:auto" \
    --out "$GS/layer_ab"
    [ -d gpu_before ] && step layer_old 200 bash -c "cd gpu_before && env PYTHONPATH=$PWD/gpu_before:$BASE \
      python3 benchmarks/moe.py --configs 7b --no-naive --no-breakdown --rows reduced --gemm ws:128x256x64:auto \
      --out $GS/layer_ab/old" ;;
esac; done
echo "== all done $(date +%T)"
