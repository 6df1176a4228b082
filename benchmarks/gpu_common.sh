# Shared start of the benchmarks/run_*_gpu.sh scripts; source it with a default output folder name:
#   source "$(dirname "$0")/gpu_common.sh" topk-out
# Strict variables, a pipeline's status is its first failure, unbuffered Python, the Hypothesis
# "gpu" profile, logs and JSON under $OUT (default /tmp/<name>), and the device it ran on.
set -u -o pipefail
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu}
export OUT=${OUT:-/tmp/${1:-sonic-learn-gpu}}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
