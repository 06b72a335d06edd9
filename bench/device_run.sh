#!/usr/bin/env bash
# Everything the GPU machine runs, in order; every step is logged under $OUT and a failing
# step never stops the next one. Usage (repository root on the device):
#     OUT=/some/folder bash bench/device_run.sh [extra arguments for fused_vs_eager.py]
# Environment: BENCH_ARGS (default --quick) and BENCH_MAX_MINUTES (default 6) shape the benchmark;
# SKIP_BUILD=1, SKIP_TESTS=1, SKIP_BENCH=1, SKIP_MICRO=1 leave steps out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder that comes back}"
mkdir -p "$OUT"
SUMMARY="$OUT/steps.txt"
: > "$SUMMARY"

step() {   # step NAME COMMAND...: run, log stdout+stderr to $OUT/NAME.log, record the exit status
    local name="$1"; shift
    local start=$SECONDS
    echo "== $name: $*" | tee -a "$SUMMARY"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   $name: exit $rc after $((SECONDS - start)) s" | tee -a "$SUMMARY"
    tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
    return 0
}

step environment bash -c 'nvidia-smi; python --version; python -c "import torch, triton; \
print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"; \
git log --oneline -3; git status --short'

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    step build env MAX_JOBS=16 pip install --no-deps --no-build-isolation -e .
fi

wheel=$(ls .wheels/nvidia_cudnn_frontend-*cp312*.whl 2>/dev/null | head -n 1)
if [ -n "$wheel" ]; then
    step cudnn_frontend pip install --no-deps "$wheel"
else
    echo "== cudnn_frontend: no wheel in .wheels/ (run bench/fetch_cudnn_frontend.sh here first)" | tee -a "$SUMMARY"
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    FUSED_PREACT_AOT_ALL=1 step tests python -m pytest tests -q -ra --junitxml="$OUT/tests.xml"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    step benchmark python bench/fused_vs_eager.py ${BENCH_ARGS:---quick} \
        --max-minutes "${BENCH_MAX_MINUTES:-6}" --out "$OUT/benchmark" "$@"
fi

if [ "${SKIP_MICRO:-0}" != 1 ]; then
    step micro python -m pytest bench/micro --benchmark-only -q \
        --benchmark-json="$OUT/micro.json" --benchmark-columns=min,median,max,rounds
fi

echo "done; logs and results in $OUT" | tee -a "$SUMMARY"
