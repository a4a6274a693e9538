#!/usr/bin/env bash
# The demo: prepare scikit-learn's digits as WebDataset shards, verify them, stream one epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=launch/recipes/digits-demo.yaml
data=work/demo/data

echo "== 1. prepare digits shards into $data"
ssl-dist data prepare --source digits --out "$data" --samples-per-shard 200 --overwrite
echo "== 2. verify checksums and decode every sample"
ssl-dist data verify "$data"
echo "== 3. stream one epoch as rank 0 of 2 (2 loader workers)"
ssl-dist data stream --config "$recipe" --world-size 2 -o data.loader_workers=2
