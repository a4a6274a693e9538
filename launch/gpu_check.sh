#!/usr/bin/env bash
# GPU check: the per-worker training path (no Ray) on one GPU for SimCLR, MoCo v2 and MoCo v3,
# bf16 and fp32, ZeRO 0 and 2, ResNet-18 at 32 px and ResNet-50 at 224 px; prints a table of
# images/s, step-time split, peak memory and model FLOP/s against a measured bf16 peak, writes
# JSON, exits non-zero if any case fails. See README "GPU check".
#
#   bash launch/gpu_check.sh --prepare                   # here: wheels + Fashion-MNIST files
#                                                        # into .gpu/ (needs PyPI and make install)
#   bash launch/gpu_check.sh [--steps 30] [--out F]      # on the GPU machine (carry .gpu/)
#   bash launch/gpu_check.sh --device cpu --steps 2      # rehearsal on a CPU (tests run it)
#
# The GPU machine has Python 3.12 with torch, torchvision and timm but no DeepSpeed, pydantic,
# webdataset or kornia, and no network: --prepare downloads those (and what they need that it
# lacks) as wheels for CPython 3.12 into .gpu/wheels; the check installs them with
# pip --no-index into a private target directory when they do not import.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
WHEELS=(
  deepspeed==0.19.8 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
  webdataset==1.0.2 braceexpand==0.1.7 kornia==0.9.0 kornia_rs==0.2.0
)

prepare() {
  make -s install
  local py=.venv/bin/python
  rm -rf "$GPU_DIR/wheels"
  mkdir -p "$GPU_DIR/wheels"
  # DeepSpeed is published as a source archive only: build its pure-Python wheel here (no ops
  # compiled ahead; they are JIT-built on first use where needed).
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$GPU_DIR/wheels" \
    "${WHEELS[0]}"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$GPU_DIR/wheels" "${WHEELS[@]:1}"
  # Fashion-MNIST's IDX files (30 MB; the check writes shards of 10,000 images from them).
  if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    mkdir -p "$GPU_DIR/fashion-mnist"
    cp /usr/share/datasets/fashion-mnist/*-ubyte.gz "$GPU_DIR/fashion-mnist/"
  else
    echo "no Fashion-MNIST here (apt-get install dataset-fashion-mnist): the check will" \
      "use digits" >&2
  fi
  grep -qxF "/$GPU_DIR/" .git/info/exclude 2>/dev/null || echo "/$GPU_DIR/" >>.git/info/exclude
  du -sh "$GPU_DIR"
  echo "carry '$GPU_DIR' to the GPU machine and run: bash launch/gpu_check.sh"
}

if [ "${1:-}" = "--prepare" ]; then
  prepare
  exit 0
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import deepspeed, pydantic, webdataset, kornia" 2>/dev/null; then
  if ! ls "$GPU_DIR"/wheels/*.whl >/dev/null 2>&1; then
    echo "gpu_check: DeepSpeed, pydantic, webdataset or kornia is missing and there are no" \
      "wheels in $GPU_DIR/wheels (run: bash launch/gpu_check.sh --prepare)" >&2
    exit 2
  fi
  site=$(mktemp -d /tmp/ssl-dist-site.XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$GPU_DIR"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" -m ssl_dist.bench.gpu_check "$@"
