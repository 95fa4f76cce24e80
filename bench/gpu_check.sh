#!/usr/bin/env bash
# The GPU measurement of bench/gpu_step.py in one call on a machine with an NVIDIA GPU and PyTorch but no
# package index (the device machine of bench/README.md). Two steps:
#
#   bash bench/gpu_check.sh --prepare   # here, with pip and the index: wheels for Python 3.12 + BasicSR's sdist into .whl/
#   bash bench/gpu_check.sh             # there, from the repository root: results under $OUT (default ./gpu_results)
#
# There it installs nothing but the carried wheels (into /tmp/site), then runs the whole benchmark (BasicSR's
# step and ours at batch 16 and 64, inference, numerics) with a time limit, and the CUDA-only tests.
set -uo pipefail
WHEELS=.whl
if [ "${1:-}" = "--prepare" ]; then
    mkdir -p "$WHEELS"
    # What gan_core needs beyond the device image's packages (torch, numpy, scipy, scikit-image, pyarrow, PyYAML,
    # safetensors, opencv are there): pydantic and its parts, lpips.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        lpips==0.1.4 || exit 1
    cp "${BASICSR_SDIST:-.venv/reference/basicsr-1.4.2.tar.gz}" "$WHEELS"/ || exit 1
    ls -l "$WHEELS"
    exit 0
fi
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 BASICSR_SDIST=$PWD/$WHEELS/basicsr-1.4.2.tar.gz
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/machine.txt"
# The benchmark first (the numbers this is for), then the CUDA tests; each under its own limit.
timeout "${GPU_STEP_LIMIT_S:-420}" python3 -m bench.gpu_step --json "$OUT/gpu_step.json" 2>&1 | tee "$OUT/gpu_step.md"
timeout "${TEST_LIMIT_S:-120}" python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m "not slow" \
    -k "cuda or gpu" \
    tests/gan_core 2>&1 | tail -20 | tee "$OUT/cuda_tests.txt"
