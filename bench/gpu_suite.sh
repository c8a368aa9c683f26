#!/usr/bin/env bash
# One prepared GPU check: every GPU measurement of this project in one call (bench/gpu_suite.py has the details).
#
#   bash bench/gpu_suite.sh OUTDIR              # on the GPU machine: setup + 6 parts in at most 8 minutes
#   bash bench/gpu_suite.sh OUTDIR --dry-run    # on a CPU: the same at tiny shapes (tests/test_gpu_suite.py)
#
# On the device tool: command `bash bench/gpu_suite.sh $OUT`, carry [".gpu_wheels"] (bench/gpu_wheels.sh fills it),
# timeout_s 600. Exit status 0 only when every part passed; the summary is the last thing printed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: bash bench/gpu_suite.sh OUTDIR [--dry-run] [--parts ...] [--limit PART=SECONDS] [--budget SECONDS]" >&2
  exit 2
fi
# The project's venv where there is one (CPU machines); python3 on the GPU machine is the one that holds PyTorch.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" bench/gpu_suite.py "$@"
