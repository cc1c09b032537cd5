#!/bin/sh
# Idempotent: a private venv with a real Cinder (from PyPI) used as a local test peer.
# Separate from .venv because Cinder pins its own stack (oslo.*, SQLAlchemy, eventlet).
# Fast no-op when the venv exists and cinder imports.
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV="$REPO/.venv-cinder"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import cinder.volume.drivers.nfs, fixtures' 2>/dev/null \
    && [ -x "$VENV/bin/cinder-manage" ]; then
    exit 0
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
    echo "cinder_setup: Cinder needs Python >= 3.11 ($PY is older)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
log=$(mktemp)
if ! "$VENV/bin/pip" install -q --disable-pip-version-check "cinder>=29,<30" fixtures >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; echo "cinder_setup: pip install failed" >&2; exit 1
fi
rm -f "$log"
"$VENV/bin/python" -c 'import cinder.volume.drivers.nfs, fixtures'
echo "cinder_setup: $("$VENV/bin/python" -c 'import importlib.metadata as m; print("cinder", m.version("cinder"))') in $VENV"
