#!/usr/bin/env bash
# Create benchmarks/.venv-litellm-proxy: the LiteLLM proxy in its own virtual environment
# (so its pins never touch the project's venv), for benchmarks/vs_litellm_proxy.py.
#
#   bash benchmarks/setup_litellm_proxy.sh            # uses python3.11 (or $PYTHON)
#   LITELLM_PROXY_SPEC='litellm[proxy]==1.108.7' bash benchmarks/setup_litellm_proxy.sh
#
# pip uses the machine's configured indexes (pip.conf); nothing else is downloaded.
# Idempotent: an existing venv whose `litellm` imports is left as it is.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${LITELLM_PROXY_VENV:-$here/.venv-litellm-proxy}"
spec="${LITELLM_PROXY_SPEC:-litellm[proxy]}"
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if [[ -x "$venv/bin/litellm" ]] && "$venv/bin/python" -c 'import litellm.proxy.proxy_server' >/dev/null 2>&1; then
    echo "litellm proxy venv ready: $venv ($("$venv/bin/python" -m pip show litellm 2>/dev/null | sed -n 's/^Version: //p'))"
    exit 0
fi
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$spec"
# offline: the bundled model cost map, no telemetry, no hub look-ups
LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_OFFLINE_MODE=true \
    "$venv/bin/python" -c 'import litellm.proxy.proxy_server, litellm; print("litellm proxy", litellm.__file__)'
echo "litellm proxy venv ready: $venv ($("$venv/bin/python" -m pip show litellm | sed -n 's/^Version: //p'))"
