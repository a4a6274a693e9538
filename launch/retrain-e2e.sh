#!/usr/bin/env bash
# Scheduled retraining end to end on one machine, against a real MLflow tracking server:
#   0. a local `mlflow server` (sqlite, served artifacts) on 127.0.0.1, and an encoder already in
#      production: a barely trained one registered with the `champion` alias;
#   1. new data lands; the schedule fires: `ssl-dist retrain` warm-starts from the champion,
#      pretrains on the newest manifest, probes both encoders on the fixed evaluation shards and
#      moves `champion` to the challenger (it wins by more than the margin);
#   2. the schedule fires again before more data lands: the same command trains nothing.
# The champion alias moves exactly once; the script fails if it does not.
set -euo pipefail
cd "$(dirname "$0")/.."
work=work/retrain-e2e
recipe=launch/recipes/digits-demo.yaml
model=digits-encoder
export SSL_DIST_LOG=${SSL_DIST_LOG:-WARNING} SSL_DIST_NO_PROGRESS=1
rm -rf "$work" && mkdir -p "$work/drops"

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== 0. mlflow server on 127.0.0.1:$port (log: $work/mlflow-server.log)"
mlflow server --host 127.0.0.1 --port "$port" --workers 1 \
  --backend-store-uri "sqlite:///$PWD/$work/mlflow.db" \
  --serve-artifacts --artifacts-destination "$PWD/$work/mlartifacts" >"$work/mlflow-server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
export MLFLOW_TRACKING_URI="http://127.0.0.1:$port"
for _ in $(seq 120); do
  python -c "import urllib.request as u; u.urlopen('$MLFLOW_TRACKING_URI/health', timeout=1)" \
    2>/dev/null && break
  kill -0 $server 2>/dev/null || { cat "$work/mlflow-server.log"; exit 1; }
  sleep 0.5
done

quiet() { grep --line-buffered -vE "PlacementGroupCleaner|Checkpoint successfully|Reporting training|^\s*$" || true; }
ssl-dist data prepare --source digits --out "$work/eval" --samples-per-shard 400 >/dev/null
ssl-dist data prepare --source digits --out "$work/drops/2026-11-01" --seed 1 \
  --samples-per-shard 400 >/dev/null
echo "   the encoder in production: 1 step of SimCLR, registered as $model@champion"
ssl-dist pretrain -c "$recipe" -o data.manifest="$work/drops/2026-11-01/manifest.json" \
  -o run.storage_path="$work/runs" -o run.name=production -o run.max_steps=1 \
  -o tracking.model_name=$model -o tracking.alias=champion 2>&1 | quiet | grep -E "^registered"

tick() {
  ssl-dist retrain -c "$recipe" --data "$work/drops/*/manifest.json" --eval-data "$work/eval" \
    -o run.storage_path="$work/runs" -o run.max_steps=60 -o tracking.model_name=$model \
    --out "$work/decision-$1.json" 2>&1 | quiet | grep -E "^(retrain|decision):"
}
ssl-dist data prepare --source digits --out "$work/drops/2026-11-28" --seed 2 \
  --samples-per-shard 400 >/dev/null
echo "== 1. new data landed ($work/drops/2026-11-28); the schedule fires"
tick 1
echo "== 2. the schedule fires again; no new data since"
tick 2

echo "== the registry"
python - "$model" <<'EOF'
import json, sys
from mlflow import MlflowClient

name = sys.argv[1]
c = MlflowClient()
versions = sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
for v in versions:
    full = c.get_model_version(name, v.version)
    tags = full.tags
    print(f"   version {v.version}: aliases {full.aliases or '-'}, decision "
          f"{tags.get('ssl_dist.retrain_decision', '- (registered by hand)')}, probe top-1 "
          f"{tags.get('ssl_dist.retrain_challenger_top1', '-')} vs champion "
          f"{tags.get('ssl_dist.retrain_champion_top1', '-')}")
d1, d2 = (json.load(open(f"work/retrain-e2e/decision-{i}.json")) for i in (1, 2))
champion = c.get_model_version_by_alias(name, "champion").version
moved = [d for d in (d1, d2) if d["decision"] == "promoted"]
print(f"   tick 1: {d1['decision']}; tick 2: {d2['decision']}; champion is version {champion}")
ok = d1["decision"] == "promoted" and d2["decision"] == "skipped" and len(moved) == 1 \
    and champion == d1["challenger_version"] and len(versions) == 2
print("the champion alias moved once" if ok else "UNEXPECTED: see the decisions above")
sys.exit(0 if ok else 1)
EOF
