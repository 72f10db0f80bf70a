#!/usr/bin/env bash
# The GPU checks in one run, most needed first. Each step runs under its own time
# limit, so one slow step (a long compile) cannot use up the others' time; the steps' outputs go to
# $OUT if it is set, else runs/gpu_checks.
#
#   bash benchmarks/gpu_checks.sh                         # tests pyramidnet-step moex-op: <= 7.5 min
#   bash benchmarks/gpu_checks.sh speed-resnet18 pyramidnet-step-compile   # whole runs; compiled: <= 8.5 min
#   bash benchmarks/gpu_checks.sh speed-pyramidnet compile-pyramidnet      # PyramidNet-200 on CIFAR: <= 9 min
#
# Each line's limits add up to less than 10 minutes of GPU time.
#
# Needs: timm with timm.task (pip install a newer timm wheel, e.g. from .whl/, where the installed one is
# older); CIFAR-10 as JPEG in data/cifar10, or its archive at data/cifar10_jpeg.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests pyramidnet-step moex-op)
KNOWN=" tests moex-op speed-resnet18 speed-pyramidnet compile-resnet18 compile-pyramidnet pyramidnet-step pyramidnet-step-compile "
for s in "${STEPS[@]}"; do
    if [[ "$KNOWN" != *" $s "* ]]; then
        echo "unknown step '$s'; the steps are:$KNOWN" >&2
        exit 2
    fi
done
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT"

step() {  # step LIMIT_S NAME COMMAND...: run COMMAND into $OUT/NAME.txt and report its exit and time
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/steps.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "   exit $rc$([ $rc -eq 124 ] && echo ' (time limit)'), $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
    tail -n 12 "$OUT/$name.txt"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import platform, torch, timm, accelerate; print('python', platform.python_version(), 'torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/env.txt"
if ! python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "no CUDA device: these are the GPU checks (the CPU ones are the test suite and --cpu-sized benchmarks)" | tee -a "$OUT/env.txt"
    exit 6
fi
if ! python -c "import timm.task" 2>/dev/null; then
    echo "this timm has no timm.task; pip install a newer timm (a wheel in .whl/, say) first" | tee -a "$OUT/env.txt"
    exit 3
fi
python -m pip install -q --no-deps -e . > "$OUT/install.txt" 2>&1 || { tail "$OUT/install.txt"; exit 4; }
if [ ! -d data/cifar10/train ] && [ -f data/cifar10_jpeg.tar.gz ]; then
    mkdir -p data/cifar10 && tar xzf data/cifar10_jpeg.tar.gz -C data/cifar10
fi
if [ ! -d data/cifar10/train ] && [[ " ${STEPS[*]} " == *" speed-"* || " ${STEPS[*]} " == *" compile-"* ]]; then
    echo "no data/cifar10/train and no data/cifar10_jpeg.tar.gz: the speed steps need CIFAR-10 as JPEG" | tee -a "$OUT/env.txt"
    exit 5
fi

for s in "${STEPS[@]}"; do
    case $s in
        # The CUDA branches that the CPU suite cannot run: the Triton kernels compiled for the GPU
        # (not interpreted), the compiled hook, and the meter's updates under set_sync_debug_mode('error').
        tests) step 180 tests python -m pytest -q -x tests/test_moex_triton.py tests/test_train.py \
            -k "triton or compiled or metrics" ;;
        moex-op) step 90 moex-op python benchmarks/bench_moex.py --device cuda --repeats 20 ;;
        speed-resnet18) step 200 speed-resnet18 python benchmarks/bench_train_speed.py --data-dir data/cifar10 \
            --only moex-resnet18 --repeats 2 --log "$OUT/speed.txt" ;;
        speed-pyramidnet) step 180 speed-pyramidnet python benchmarks/bench_train_speed.py --data-dir data/cifar10 \
            --only moex-pyramidnet --repeats 1 --log "$OUT/speed.txt" ;;
        compile-resnet18) step 240 compile-resnet18 python benchmarks/bench_train_speed.py --data-dir data/cifar10 \
            --only moex-resnet18 --repeats 1 --compile-moex --compile-mode reduce-overhead --log "$OUT/speed.txt" ;;
        # The paper-code setup against train_moex.py compiled (compiling PyramidNet-200 is most of it).
        compile-pyramidnet) step 330 compile-pyramidnet python benchmarks/bench_train_speed.py --data-dir data/cifar10 \
            --only compile --log "$OUT/speed.txt" ;;
        # The paper's recipe on a synthetic batch (no data needed): the authors' training step against the MoEx
        # task in fp32 and in bf16 + channels_last, PyramidNet-200 at batch 64; about 100 s (4 models, cuDNN
        # autotuning, 3 x 60 steps).
        pyramidnet-step) step 180 pyramidnet-step python benchmarks/bench_pyramidnet_step.py --steps 20 --repeats 3 ;;
        # The bf16 arm compiled with dynamo's cudagraphs backend (no code generation); the table's "first steps" is
        # the launch-to-first-step time with the compilation of both graphs (MoEx and plain).
        pyramidnet-step-compile) step 300 pyramidnet-step-compile python benchmarks/bench_pyramidnet_step.py \
            --arms authors --compile-backend cudagraphs --steps 20 --repeats 3 ;;
    esac
done
