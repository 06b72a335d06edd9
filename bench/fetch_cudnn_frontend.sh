#!/usr/bin/env bash
# Download the nvidia-cudnn-frontend wheel (the `cudnn` Python module) for the GPU machine,
# which has no package registry: Python 3.12, manylinux x86_64, into .wheels/ (ignored by git).
# bench/device_run.sh installs it from there when present.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .wheels
python -m pip download nvidia-cudnn-frontend --no-deps --python-version 3.12 --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .wheels "$@"
ls -l .wheels/nvidia_cudnn_frontend-*.whl
