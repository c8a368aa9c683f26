#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that the GPU machine lacks, for bench/gpu_suite.sh to install offline.
#
#   bash bench/gpu_wheels.sh                  # -> .gpu_wheels/ (ignored by git; carry it to the GPU machine)
#   bash bench/gpu_wheels.sh --with-pyarrow   # also pyarrow (55 MB), installed there only if its own is too old
#
# The GPU machine (see bench/README.md, "GPU suite") runs Python 3.12 with torch 2.11, triton 3.6, transformers
# 5.17, accelerate and peft, but without tyro (every script imports it), datasets (common/data.py reads every data
# file through it; TRL needs it), trl or liger-kernel. wandb is not fetched: the scripts import it only with --track.
# Every wheel is fetched with --no-deps for CPython 3.12 on manylinux x86_64 (all but pyarrow are pure Python;
# multiprocess ships one wheel per Python version), so the folders list every package that gets installed:
#   base/       always installed: what the scripts import and the machine lacks
#   if-needed/  installed only where the machine's own version misses a requirement of a base/trl package
#               (datasets pins fsspec <= 2026.9.0 and pyarrow >= 24; typeguard needs typing_extensions >= 4.14)
#   trl-1.12.0/ bench/ppo_step.py (PPOTrainer is gone from 1.13); trl-1.16.0/ bench/grpo_step.py (--trl-path)
#   liger/      Liger-Kernel's rows of bench/kernels.py
# The pins are the versions of requirements.txt / bench/requirements.txt and of this project's tested venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
DEST=.gpu_wheels
PYVER=3.12  # python3 on the GPU machine is 3.12.3 (the device notes, KINDS.md)
WITH_PYARROW=0
for arg in "$@"; do
  case $arg in
    --with-pyarrow) WITH_PYARROW=1 ;;
    *) echo "usage: bash bench/gpu_wheels.sh [--with-pyarrow]" >&2; exit 2 ;;
  esac
done

download() {  # download FOLDER SPEC...
  local folder=$1
  shift
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST/$folder" "$@"
}

rm -rf "$DEST"
download base tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
download if-needed typing-extensions==4.16.0 fsspec==2026.9.0
if [ "$WITH_PYARROW" = 1 ]; then download if-needed pyarrow==26.0.1; fi
download trl-1.12.0 trl==1.12.0
download trl-1.16.0 trl==1.16.0
download liger liger-kernel==0.8.5

find "$DEST" -name '*.whl' -printf '%s\t%P\n' | sort -k2 | awk -F'\t' '{printf "%8.0f KiB  %s\n", $1 / 1024, $2}'
echo "total: $(du -sb "$DEST" | cut -f1) bytes in $DEST/; carry it with the suite: carry [\"$DEST\"]"
