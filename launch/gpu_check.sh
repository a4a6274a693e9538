#!/usr/bin/env bash
# GPU check: a few hundred SimCLR steps on one GPU with NCCL, bf16 and ZeRO-2; prints images/s.
# Usage: bash launch/gpu_check.sh [steps]   (needs a CUDA GPU; installs via `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-300}
make -s install
export PATH="$PWD/.venv/bin:$PATH" SSL_DIST_NO_PROGRESS=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here')"
data=work/gpu/data
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  ssl-dist data prepare --source fashion-mnist --out "$data" --samples-per-shard 2000 --overwrite
else
  ssl-dist data prepare --source digits --out "$data" --samples-per-shard 100 --overwrite
fi
ssl-dist pretrain --config launch/recipes/digits-demo.yaml \
  -o data.manifest="$data/manifest.json" -o data.channels=3 -o data.batch_size=256 \
  -o data.loader_workers=4 -o model.encoder=resnet18 -o model.small_stem=true \
  -o optim.name=sgd -o optim.lr=0.3 -o zero.stage=2 -o zero.precision=bf16 \
  -o scaling.num_workers=1 -o scaling.use_gpu=yes -o scaling.cpus_per_worker=8 \
  -o run.epochs=1000 -o run.max_steps="$steps" -o run.checkpoint_every=100000 \
  -o run.name="gpu-check-$(date +%s)" -o run.storage_path=work/gpu/runs
