#!/usr/bin/env bash
# Download, HERE (a machine with a package index), the wheels a GPU machine without network access lacks, for its
# Python 3.12 on manylinux x86_64, into .whl/ (git-ignored). benchmarks/gpu_proof.sh installs them there with
# `pip install --no-index --no-deps --target` and puts them first on PYTHONPATH.
#
# usage: bash benchmarks/gpu_proof_wheels.sh [NAME==VERSION ...]   (default: the list below)
# env:   WHEELS_DIR (default .whl), PYTHON (default python3), PY_VERSION (default 3.12)
#
# The default list is what the GPU image this was prepared for (Python 3.12, PyTorch 2.11 + CUDA 13, transformers
# 5.17, no bitsandbytes, no pytest-html) lacks for kolora-probe, pinned to the versions this project is tested with:
#   bitsandbytes      not installed there (its wheel carries the CUDA 13.0 kernels: libbitsandbytes_cuda130.so)
#   pytest-html       not installed there (the HTML report), with pytest-metadata, its only missing need
#   transformers      5.17 there; requirements.txt needs >= 5.20 (its needs, huggingface_hub >= 1.31,
#                     tokenizers 0.23, safetensors 0.8, are there)
#   peft              pinned to requirements.txt's 0.21 series (the image's version is unrecorded)
# Everything else (torch, accelerate, safetensors, tokenizers, huggingface_hub, nvidia-ml-py, psutil, matplotlib,
# pytest, pytest-benchmark, jinja2) is in the image. The wheels are copied to the GPU machine with the checkout,
# so the total is kept under 60 MiB (printed at the end; bitsandbytes alone is ~41 MiB).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${WHEELS_DIR:-$ROOT/.whl}
PY=${PYTHON:-python3}
PYV=${PY_VERSION:-3.12}
LIMIT_MIB=60
if [ $# -gt 0 ]; then WANT=("$@"); else
  WANT=(bitsandbytes==0.50.2 pytest-html==4.2.0 pytest-metadata==3.1.1 transformers==5.24.0 peft==0.21.2)
fi

mkdir -p "$DIR"
if [ "$DIR" = "$ROOT/.whl" ] && ! git -C "$ROOT" check-ignore -q "$DIR/x.whl"; then
  echo "gpu_proof_wheels.sh: $DIR is not git-ignored; add '/.whl/' to .git/info/exclude (or .gitignore)" >&2
  exit 2
fi
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DIR" "${WANT[@]}"

# one version of each distribution: two stop the whole install on the device
dups=$(cd "$DIR" && ls *.whl | sed -E 's/-[0-9][^-]*-.*//' | tr 'A-Z_' 'a-z-' | sort | uniq -d)
if [ -n "$dups" ]; then
  echo "gpu_proof_wheels.sh: more than one wheel of: $dups in $DIR; delete the versions you do not want" >&2
  exit 1
fi
total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
mib=$(( (total + 1048575) / 1048576 ))
ls -l "$DIR"/*.whl
echo "total ${mib} MiB in $DIR"
if [ $mib -gt $LIMIT_MIB ]; then
  echo "gpu_proof_wheels.sh: ${mib} MiB of wheels is over ${LIMIT_MIB} MiB; carry fewer" >&2
  exit 1
fi
