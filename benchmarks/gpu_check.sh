#!/usr/bin/env bash
# The GPU check of issue 12: on a CUDA machine, CUDA tests, the shared demo in bf16 against the CPU run, DDP on every
# GPU, the Train page's launcher, latency and throughput, into benchmarks/results/gpu_check_<gpu-name>.json.
# Without CUDA it says so and exits 0; --dry-run-cpu runs the same steps on the CPU with tiny settings.
# Options: see `python benchmarks/gpu_check.py --help`. Python: $PYTHON, else the project's .venv, else python3.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" benchmarks/gpu_check.py "$@"
