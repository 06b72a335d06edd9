#!/usr/bin/env bash
# Everything a GPU machine runs, in one command, packed into the few files that come back.
# Usage (repository root on the device; bench/README.md has the plan and the expected times):
#
#     OUT=/folder bash bench/device_run.sh --budget [extra arguments for fused_vs_eager.py]
#     OUT=/folder bash bench/device_run.sh          [extra arguments for fused_vs_eager.py]
#
# --budget (or BUDGET_S=<seconds>; --budget means 540, 9 minutes of a 10-minute command): one command
#   that ends inside the budget on a bare machine, even if a step hangs. Steps, in this order, each
#   under `timeout` with its own cap (bench/device_budget.py's plan; CAP_<STEP>=seconds overrides)
#   and never past what the steps after it must keep (their minimums, so each gets at least that):
#     environment | build (sm_90+PTX, 16 jobs) | check (python -m fused_preact.check --quick --json:
#     every operator and unit form on the GPU against float64, before any test) | compute-sanitizer
#     memcheck, racecheck over a sample of the CUDA operator tests (gpu and cuda_kernels marks; tiny
#     shapes; SAMPLE_MEMCHECK=3 / SAMPLE_RACECHECK=2 cases per test function) | tests (the gpu-marked
#     tests, then the fused units' and Triton operators' tests, the default sample: no --full) |
#     memory (bench/memory.py: ResNet-1001 bf16, only with time to spare; MEMORY_BENCH_ARGS) |
#     benchmark (BENCH_ARGS; default: the headline selection with the +graph contenders, then the
#     original-unit cases, --max-minutes from the time left) | pack.
# Without --budget: no deadline; the check (not quick), the whole test suite with --full, the
# benchmark (--quick) and bench/micro.
# Either way logs, JUnit XML, the check's JSON and benchmark outputs go to a work folder ($WORK,
# default a temporary one), and bench/pack_outputs.py packs them into $OUT: summary.txt,
# device_run.tar.gz, check.json, memory.json, memory.png and the benchmark's results.json /
# report.md / speedup.png (at most 8 files, 16 MiB each, flat).
# $OUT/summary.txt is rewritten after every step, so a killed command still returns the steps so far.
#
# DRY_RUN=1 (automatic when torch sees no GPU) runs everything the GPU is not needed for: no build,
# the check on the CPU (--device cpu), the sanitizer steps' pytest without compute-sanitizer, the
# GPU-marked tests (they skip), the benchmark's CPU smoke run on one tiny unit.
# Other switches: SKIP_BUILD=1 (a warm machine that built already), SKIP_CHECK=1, SKIP_TESTS=1,
# SKIP_SANITIZER=1, SKIP_MEMORY=1, SKIP_BENCH=1, SKIP_MICRO=1; TEST_TIMEOUT (seconds per test,
# default 60); FUSED_PREACT_GIT_COMMIT (the commit, recorded where the copied tree has no .git).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder that comes back}"
BUDGET_S="${BUDGET_S:-}"
if [ "${1:-}" = "--budget" ]; then
    shift
    BUDGET_S="${BUDGET_S:-540}"
fi
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then   # the interpreter that holds torch (python3 on the device machines)
    for candidate in python3 python; do
        if "$candidate" -c "import torch" 2> /dev/null; then PYTHON=$candidate; break; fi
    done
    PYTHON="${PYTHON:-python3}"
fi
WORK="${WORK:-$(mktemp -d /tmp/device_run.XXXXXX)}"
mkdir -p "$OUT" "$WORK"
STEPS="$WORK/steps.txt"
: > "$STEPS"
START=$SECONDS
if [ -n "$BUDGET_S" ]; then   # PLAN_CAP_<STEP>, PLAN_RESERVE_<STEP>, PACK_RESERVE, GRACE, MIN_STEP
    eval "$("$PYTHON" bench/device_budget.py --budget "$BUDGET_S" --shell)"
fi
# shellcheck source=bench/device_steps.sh
. bench/device_steps.sh   # note, step, step_background, finish_background: caps, deadline, log

planned() {   # planned STEP: sets CAP (CAP_<STEP> overrides the plan; 0 = none without a budget) and
    # RESERVE (what the steps after it keep) for the next `step`
    local key
    key=$(echo "$1" | tr 'a-z-' 'A-Z_')
    local override="CAP_$key" plan_cap="PLAN_CAP_$key" plan_reserve="PLAN_RESERVE_$key"
    CAP="${!override:-${!plan_cap:-0}}"
    RESERVE="${!plan_reserve:-0}"
}

if [ -z "${DRY_RUN:-}" ]; then
    if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
        DRY_RUN=0
    else
        DRY_RUN=1
    fi
fi
dry() { [ "$DRY_RUN" = 1 ]; }

# -- pytest with a per-test time limit (pytest-timeout where installed, else tests/conftest.py's alarm)
TEST_TIMEOUT="${TEST_TIMEOUT:-60}"
if "$PYTHON" -c "import pytest_timeout" 2> /dev/null; then
    PER_TEST=(--timeout="$TEST_TIMEOUT" --timeout-method=signal)
else
    PER_TEST=()
    export FUSED_PREACT_TEST_TIMEOUT="$TEST_TIMEOUT"
fi
# Without a budget every pytest step runs the whole cross-product sweep (--full); under the budget
# the default run's sample (tests/conftest.py), which fits.
FULL=()
[ -z "$BUDGET_S" ] && FULL=(--full)
pytest_cmd() {   # pytest_cmd NAME ARGS...: sets CMD to one pytest run writing $WORK/junit-NAME.xml
    local name="$1"; shift
    CMD=("$PYTHON" -m pytest -q -rfEs -p no:cacheprovider ${FULL[@]+"${FULL[@]}"} ${PER_TEST[@]+"${PER_TEST[@]}"}
         --junitxml="$WORK/junit-$name.xml" "$@")
}

MARKED=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
TRITON_TESTS="tests/test_triton_ops.py tests/test_triton_bn.py tests/test_triton_conv.py"
# fused units and operators on whatever device there is (both backends against eager / float64): the
# pre-activation and original units, per-side padding, the memory="min" recompute, the first-use check
FUSED_TESTS="tests/test_fused_backends.py tests/test_original_units.py tests/test_bn_add_relu.py \
tests/test_conv_padding.py tests/test_memory_mode.py tests/test_original_memory.py tests/test_self_check.py"
# the extension's CUDA kernels: gpu-marked tests and the cuda_kernels cases (bn_add_relu, padded convs)
SANITIZED_TESTS="tests/test_conv1x1_cuda.py tests/test_cpp_ops.py tests/test_bn_add_relu.py tests/test_conv_padding.py"

note "device run: $( dry && echo 'DRY RUN (no GPU: GPU steps left out) ' )budget ${BUDGET_S:-none} s, work folder $WORK"

# -- 1. what the machine is ---------------------------------------------------------------------------
planned environment
step environment "$CAP" bash -c "nvidia-smi || echo 'no nvidia-smi'; $PYTHON --version; \
$PYTHON -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", \
triton.__version__, \"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'; \
nvcc --version | tail -n 2 || echo 'no nvcc'; compute-sanitizer --version | head -n 2 || echo 'no compute-sanitizer'; \
ncu --version | tail -n 1 || echo 'no ncu'; $PYTHON -c 'import pytest_timeout' 2>/dev/null && echo pytest-timeout \
|| echo 'no pytest-timeout: tests/conftest.py alarm'; nproc; git rev-parse HEAD 2>/dev/null \
|| echo \"no git here; commit given: \${FUSED_PREACT_GIT_COMMIT:-none}\"; git status --short 2>/dev/null | head -n 20"

# -- 2. build (sm_90 and its PTX, 16 jobs) -------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ] && ! dry; then
    planned build
    step build "$CAP" env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 FUSED_PREACT_CUDA=1 \
        bash -c "$PYTHON -m pip install -v --no-deps --no-build-isolation -e . && $PYTHON -c \
'import torch; from fused_preact import _extension as e; print(\"extension built with CUDA:\", e.built_with_cuda(), \
e.build_info().get(\"cuda_archs\")); assert e.built_with_cuda(), e.unavailable_reason()'"
else
    note "== build: skipped ($(dry && echo 'dry run' || echo 'SKIP_BUILD=1'))"
fi

wheel=$(ls .wheels/nvidia_cudnn_frontend-*cp312*.whl 2> /dev/null | head -n 1)
if [ -n "$wheel" ] && ! dry; then
    step cudnn_frontend 30 "$PYTHON" -m pip install --no-deps "$wheel"
fi

# -- 3. the check: every operator and unit form on this device against float64, before any test -------
if [ "${SKIP_CHECK:-0}" != 1 ]; then
    CHECK_ARGS=(--json "$WORK/check.json")
    [ -n "$BUDGET_S" ] && CHECK_ARGS+=(--quick)
    dry && CHECK_ARGS+=(--device cpu --quick)
    planned check
    step check "$CAP" "$PYTHON" -m fused_preact.check "${CHECK_ARGS[@]}"
fi

# -- 4. compute-sanitizer over the CUDA operators at tiny shapes -------------------------------------------
if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
    sanitize() {   # sanitize TOOL...: compute-sanitizer's command prefix, or none in a dry run / without it
        if dry || ! command -v compute-sanitizer > /dev/null; then
            PREFIX=(env)
        else
            PREFIX=(compute-sanitizer --error-exitcode 1 --print-limit 30 "$@")
        fi
    }
    if dry || ! command -v compute-sanitizer > /dev/null; then
        note "== sanitizers: $(dry && echo 'dry run' || echo 'no compute-sanitizer'): their pytest runs without it"
    fi
    # the caching allocator hides out-of-bounds accesses inside its blocks: allocate each tensor on its own
    sanitize --tool memcheck --leak-check no
    # shellcheck disable=SC2086
    pytest_cmd memcheck -m "gpu or cuda_kernels" $SANITIZED_TESTS
    planned memcheck
    step memcheck "$CAP" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        FUSED_PREACT_SAMPLE_PER_TEST="${SAMPLE_MEMCHECK:-3}" "${PREFIX[@]}" "${CMD[@]}"
    sanitize --tool racecheck
    # shellcheck disable=SC2086
    pytest_cmd racecheck -m "gpu or cuda_kernels" $SANITIZED_TESTS
    planned racecheck
    step racecheck "$CAP" env FUSED_PREACT_SAMPLE_PER_TEST="${SAMPLE_RACECHECK:-2}" \
        "${PREFIX[@]}" "${CMD[@]}"
fi

# -- 5. tests ---------------------------------------------------------------------------------------------
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    planned tests
    if dry; then   # the GPU-marked tests skip here; the rest are the CPU suite's
        # shellcheck disable=SC2086
        pytest_cmd gpu -m gpu $MARKED
    elif [ -n "$BUDGET_S" ]; then   # GPU-marked first, then both backends on CUDA tensors (not the slow AOT tests)
        # shellcheck disable=SC2086
        pytest_cmd gpu -m "gpu or not slow" $MARKED $FUSED_TESTS $TRITON_TESTS
    else
        pytest_cmd all tests
    fi
    step tests "$CAP" "${CMD[@]}"
fi

# -- 6. memory: saved activations, peak memory and the largest batch of ResNet-1001, every memory mode --------
if [ "${SKIP_MEMORY:-0}" != 1 ]; then
    if dry; then
        MEMORY_ARGS="--models cifar_resnet20 --dtypes fp32 --device cpu --batch 2"
    elif [ -n "$BUDGET_S" ]; then
        MEMORY_ARGS="--models cifar_resnet1001 --dtypes bf16 --max-batch-seconds 8 --repeats 3"
    else
        MEMORY_ARGS="--max-batch-seconds 30"
    fi
    planned memory
    # shellcheck disable=SC2086
    step memory "$CAP" "$PYTHON" bench/memory.py ${MEMORY_BENCH_ARGS:-$MEMORY_ARGS} --out "$WORK/memory"
fi

# -- 7. benchmark with whatever time is left ----------------------------------------------------------------
RESERVE=0
# the pre-activation headline first; the original (post-activation) units after it, as time allows
HEADLINE="unit/cifar/basic-16x32x32,model/cifar_resnet164,unit/cifar/basic-32x16x16,unit/cifar/basic-64x8x8,\
model/cifar_resnet110-original,model/torchvision_resnet50"
GRAPHED="eager,eager+graph,compile,fused-triton,fused-triton+graph,fused-cuda,fused-cuda+graph"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    if dry; then
        DEFAULT_BENCH="--quick --only unit/tiny/basic --mode train --contenders $GRAPHED"
    elif [ -n "$BUDGET_S" ]; then
        DEFAULT_BENCH="--quick --only $HEADLINE --mode train,pgd-train --dtype bf16,fp32 --contenders $GRAPHED"
    else
        DEFAULT_BENCH="--quick"
    fi
    remaining=$(left)
    if [ -n "$BUDGET_S" ]; then
        # start no case in the last 45 s (a case with torch.compile can take that long)
        minutes=$(awk -v s="$remaining" 'BEGIN { m = (s - 45) / 60; if (m < 0.5) m = 0.5; printf "%.1f", m }')
    else
        minutes="${BENCH_MAX_MINUTES:-6}"
    fi
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    step benchmark "$remaining" "$PYTHON" bench/fused_vs_eager.py ${BENCH_ARGS:-$DEFAULT_BENCH} \
        --max-minutes "$minutes" --out "$WORK/benchmark" "$@"
    if [ -f "$WORK/benchmark/results.json" ] && [ ! -f "$WORK/benchmark/report.md" ]; then
        step benchmark-report 20 "$PYTHON" -m bench.report "$WORK/benchmark"   # it was stopped: rebuild
    fi
fi

if [ -z "$BUDGET_S" ] && [ "${SKIP_MICRO:-0}" != 1 ] && ! dry; then
    step micro 0 "$PYTHON" -m pytest bench/micro --benchmark-only -q \
        --benchmark-json="$WORK/micro.json" --benchmark-columns=min,median,max,rounds
fi

# -- 7. pack ---------------------------------------------------------------------------------------------------
note "== pack (at $((SECONDS - START)) s): $WORK -> $OUT"
"$PYTHON" bench/pack_outputs.py "$WORK" "$OUT"
rc=$?
echo "   pack: exit $rc after $((SECONDS - START)) s in all" | tee -a "$OUT/summary.txt"
ls -l "$OUT"
cat "$OUT/summary.txt"
exit $rc
