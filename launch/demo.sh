#!/usr/bin/env bash
# The demo: digits -> WebDataset shards -> SimCLR on 2 Ray workers (DeepSpeed), tracked in
# MLflow (sqlite in work/demo/runs) -> kNN check -> the registered encoder's linear probe.
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=launch/recipes/digits-demo.yaml
data=work/demo/data
export SSL_DIST_LOG=${SSL_DIST_LOG:-WARNING}

echo "== 1. prepare scikit-learn's digits as shards in $data"
ssl-dist data prepare --source digits --out "$data" --samples-per-shard 200 --overwrite
echo "== 2. verify checksums and decode every sample"
ssl-dist data verify "$data"
echo "== 3. stream one epoch as rank 0 of 2 (2 loader workers)"
ssl-dist data stream --config "$recipe" --world-size 2 -o data.loader_workers=2
echo "== 4. pretrain SimCLR on 2 Ray workers through DeepSpeed (a fresh run each time)"
name="demo-$(date +%Y%m%d-%H%M%S)"
ssl-dist pretrain --config "$recipe" -o run.name="$name" 2>&1 \
  | grep --line-buffered -vE "PlacementGroupCleaner|Checkpoint successfully|Reporting training|^\s*$" \
  | tee work/demo/pretrain.log
ckpt=$(grep -o '^checkpoint: .*' work/demo/pretrain.log | tail -1 | cut -d' ' -f2)
[ -n "$ckpt" ] || { echo "pretraining failed: see work/demo/pretrain.log"; exit 1; }
echo "== 5. kNN accuracy of the pretrained encoder vs the same encoder at init"
ssl-dist knn "$ckpt"
model=$(grep -o '^registered: [^ ]*' work/demo/pretrain.log | tail -1 | cut -d' ' -f2)
[ -n "$model" ] || { echo "the encoder was not registered: see work/demo/pretrain.log"; exit 1; }
tracking="sqlite:///$PWD/work/demo/runs/mlflow.db"
echo "== 6. linear probe of the registered encoder $model (frozen features, val split)"
ssl-dist finetune --model "$model" --data "$data" --mode linear --tracking-uri "$tracking" \
  --out work/demo/linear.json
echo "== 7. the run in the MLflow UI:"
grep -o '^mlflow ui: .*' work/demo/pretrain.log | tail -1 | cut -d' ' -f3-
