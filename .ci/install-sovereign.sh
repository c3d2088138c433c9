#!/usr/bin/env bash
# Install the sovereign xDS control plane (PyPI `sovereign`, REST/JSON xDS v3) that the
# control-plane tests start on loopback. It lives in its own venv: it pulls FastAPI, uvicorn and
# pydantic pins that must not mix with the sidecar's environment. The tests find the binary via
# $SOVEREIGN_BIN, then /opt/sovereign-venv/bin/sovereign, then PATH.
#
# Also makes sure the gRPC xDS (ADS) client's dependency, envoy-data-plane, is in the sidecar's
# own environment (it is the `ads` extra; the ADS tests skip without it).
#
#   bash .ci/install-sovereign.sh            # idempotent; ~95 MB for the venv
set -euo pipefail
VENV="${SOVEREIGN_VENV:-/opt/sovereign-venv}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
if [ -x "$VENV/bin/sovereign" ] && "$VENV/bin/python" -m pip show sovereign >/dev/null 2>&1; then
  echo "sovereign already installed in $VENV"
else
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'sovereign==0.32.*'
  echo "sovereign installed in $VENV"
fi
"$VENV/bin/python" -m pip show sovereign 2>/dev/null | grep -E '^(Name|Version):' || true
if ! "$PY" -c 'import envoy_data_plane, grpclib' 2>/dev/null; then
  "$PY" -m pip install --quiet --disable-pip-version-check 'envoy-data-plane>=2.2,<3'
fi
