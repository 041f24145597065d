#!/usr/bin/env bash
# One device-machine call for the fractal engine: GPU agreement tests, then the throughput benchmark.
# Run from the repo root on the GPU machine (carry .whl; see ../shared/gpu/README.md):
#   bash benchmarks/gpu_session.sh            # logs go to $OUT (or ./gpu-logs without it)
set -uo pipefail
out="${OUT:-gpu-logs}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FRACTAL_PRETRAIN_CACHE=/tmp/fp-banks
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" | tee -a "$out/device.txt"
python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu-tests.log"
python3 benchmarks/render_throughput.py --device cuda 2>&1 | tee "$out/bench.jsonl"
