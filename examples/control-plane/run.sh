#!/usr/bin/env bash
# Run the whole example on loopback: sovereign (:8070), two upstreams (:19001, :19002) and the
# sidecar (listener :10000, admin :9901). Ctrl-C stops everything.
#   bash examples/control-plane/run.sh            # Envoy bootstrap (sidecar.yaml)
#   bash examples/control-plane/run.sh native     # native config (sidecar-native.yaml)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
SOVEREIGN="${SOVEREIGN_BIN:-}"
if [ -z "$SOVEREIGN" ]; then
  if [ -x /opt/sovereign-venv/bin/sovereign ]; then SOVEREIGN=/opt/sovereign-venv/bin/sovereign
  else SOVEREIGN="$(command -v sovereign || true)"; fi
fi
if [ -z "$SOVEREIGN" ]; then
  echo "sovereign is not installed: run .ci/install-sovereign.sh (or pip install 'sovereign==0.32.*' in a venv)" >&2
  exit 1
fi
WORK="$(mktemp -d)"
cp -r "$HERE/sovereign" "$WORK/"
sed -i "s#@DIR@#$WORK/sovereign#g" "$WORK/sovereign/sovereign.yaml"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
SOVEREIGN_CONFIG="file://$WORK/sovereign/sovereign.yaml" SOVEREIGN_HOST=127.0.0.1 \
  SOVEREIGN_PORT=8070 SOVEREIGN_WORKERS=1 "$SOVEREIGN" > "$WORK/sovereign.log" 2>&1 &
pids+=($!)
python "$HERE/upstream.py" 19001 & pids+=($!)
python "$HERE/upstream.py" 19002 & pids+=($!)
for _ in $(seq 1 50); do
  curl -fs http://127.0.0.1:8070/healthcheck >/dev/null 2>&1 && break; sleep 0.2
done
echo "sovereign: http://127.0.0.1:8070 (services: $WORK/sovereign/services.yaml, log: $WORK/sovereign.log)"
CFG="$HERE/sidecar.yaml"; [ "${1:-}" = native ] && CFG="$HERE/sidecar-native.yaml"
echo "try:  curl http://127.0.0.1:10000/   curl http://127.0.0.1:9901/config_dump"
python -m sidecar run -c "$CFG" & pids+=($!)
wait "${pids[-1]}"
