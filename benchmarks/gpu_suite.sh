#!/usr/bin/env bash
# Every GPU measurement of the project, for a lent CUDA machine (H100/H200).
#
# Here (with PyPI), once: fetch the pure-Python packages the GPU image lacks into .whl/
#     bash benchmarks/gpu_suite.sh fetch
# There (the device tool runs it in the repository root; carry .whl), one part per call,
# each well inside a call's 10 minutes:
#     bash benchmarks/gpu_suite.sh tests            CUDA kernel tests (Triton, SDPA per backend)
#     bash benchmarks/gpu_suite.sh kernels          benchmarks/bench_kernels.py
#     bash benchmarks/gpu_suite.sh step [VARIANTS]  benchmarks/bench_step.py (default: all variants)
# Logs and JSON go to $OUT (the device tool's folder that comes back), else benchmarks/out/.
set -euo pipefail

part=${1:-}
out=${OUT:-benchmarks/out}
wheels=.whl
python=${PYTHON:-python3}

if [[ "$part" == fetch ]]; then
    mkdir -p "$wheels"
    "$python" -m pip download --no-deps --dest "$wheels" \
        omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 webdataset==1.0.2 braceexpand==0.1.7
    exit 0
fi

case "$part" in
    tests | kernels | step) ;;
    *) echo "usage: $0 fetch | tests | kernels | step [VARIANTS]" >&2; exit 2 ;;
esac

mkdir -p "$out"
if ! "$python" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "gpu_suite: no CUDA device visible to $python" >&2
    exit 1
fi
# Install what the image lacks (no network there) and this checkout, without touching torch.
site=/tmp/sfd-site
if compgen -G "$wheels/*.whl" >/dev/null; then
    "$python" -m pip install --quiet --no-index --no-deps --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
    || { cat "$out/install.log" >&2; exit 1; }
{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
    "$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} | tee "$out/device.txt"

case "$part" in
    tests)
        "$python" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_kernels_dispatch.py \
            tests/test_compile.py 2>&1 | tee "$out/tests.log" | tail -20
        ;;
    kernels)
        "$python" benchmarks/bench_kernels.py --json "$out/kernels.json" 2>&1 | tee "$out/kernels.log" | tail -30
        ;;
    step)
        variants=${2:-eager,authors,ours,ours-step,ours-graphs,ours-step-autotune,authors+fused-adamw}
        "$python" benchmarks/bench_step.py --variants "$variants" --json "$out/step.json" 2>&1 \
            | tee "$out/step.log" | tail -30
        ;;
esac
