#!/usr/bin/env bash
# `make demo`: the replay upstream (recorded answers of a routing benchmark, no API key needed)
# in the background on 127.0.0.1:8100, then the gateway in the foreground on 127.0.0.1:8000.
# Ctrl-C stops both. `make` has already installed the project into .venv.
#
# Environment:
#   UNIROUTE_DATASET      routing benchmark folder to replay (default data/mmlu_pro_27, in the repository)
#   UNIROUTE_CONFIG       gateway config (default config.yaml)
#   UNIROUTE_REPLAY_PORT  replay port (default 8100; config.yaml's replay_models.api_base must match)
#   UNIROUTE_ROUTER_ARTIFACT  the fitted router folder (default var/router; fitted when missing)
#   VENV                  virtual environment (default .venv)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
UNIROUTE="$VENV/bin/uniroute"
PY="$VENV/bin/python"
export UNIROUTE_DATASET="${UNIROUTE_DATASET:-data/mmlu_pro_27}"
CONFIG="${UNIROUTE_CONFIG:-config.yaml}"
REPLAY_PORT="${UNIROUTE_REPLAY_PORT:-8100}"
export LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_OFFLINE_MODE=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

die() { echo "demo: $*" >&2; exit 1; }
[[ -x "$UNIROUTE" ]] || die "$UNIROUTE not found; run 'make demo' (it installs into $VENV first)"
[[ -f "$UNIROUTE_DATASET/models.csv" ]] \
  || die "no routing benchmark at '$UNIROUTE_DATASET'; set UNIROUTE_DATASET to a dataset folder"
[[ -f "$CONFIG" ]] || die "config '$CONFIG' not found"

# Is something answering on 127.0.0.1:PORT/PATH?  (no curl dependency: the venv's python)
up() { "$PY" -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" \
         "http://127.0.0.1:$1$2" >/dev/null 2>&1; }

up "$REPLAY_PORT" /health && die "port $REPLAY_PORT is already in use (set UNIROUTE_REPLAY_PORT and the config's api_base)"

echo "demo: starting the replay upstream on 127.0.0.1:$REPLAY_PORT ($UNIROUTE_DATASET)"
"$UNIROUTE" replay --dataset "$UNIROUTE_DATASET" --host 127.0.0.1 --port "$REPLAY_PORT" &
REPLAY_PID=$!
GATEWAY_PID=""
cleanup() {
  for pid in $GATEWAY_PID $REPLAY_PID; do kill "$pid" 2>/dev/null || true; done
  for pid in $GATEWAY_PID $REPLAY_PID; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for _ in $(seq 1 120); do
  up "$REPLAY_PORT" /health && break
  kill -0 "$REPLAY_PID" 2>/dev/null || die "the replay upstream exited; see the error above"
  sleep 0.5
done
up "$REPLAY_PORT" /health || die "the replay upstream did not come up within 60 s"
echo "demo: replay upstream ready"

# The UniRoute artifact: fitted once from the dataset when missing (embedding ~10k prompts takes a few
# minutes the first time; the embeddings are cached under ~/.cache/uniroute for later runs).
export UNIROUTE_ROUTER_ARTIFACT="${UNIROUTE_ROUTER_ARTIFACT:-var/router}"
if [[ ! -f "$UNIROUTE_ROUTER_ARTIFACT/artifact.json" ]]; then
  echo "demo: fitting the UniRoute router on $UNIROUTE_DATASET -> $UNIROUTE_ROUTER_ARTIFACT"
  "$UNIROUTE" router fit --dataset "$UNIROUTE_DATASET" --out "$UNIROUTE_ROUTER_ARTIFACT"
fi

mkdir -p var
echo "demo: starting the gateway on http://127.0.0.1:8000/v1 (Ctrl-C stops both)"
# In the background + wait, so that a signal to this script stops both servers at once.
"$UNIROUTE" serve --config "$CONFIG" &
GATEWAY_PID=$!
wait "$GATEWAY_PID"
