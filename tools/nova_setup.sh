#!/bin/sh
# Idempotent: a real Nova + Placement (from PyPI) in their own venv, used as a local test peer
# (testbed/nova.py), plus the Debian packages that bed needs: a private MariaDB (sqlite under
# Nova's conductor gave "database is locked" and boots that never went ACTIVE) and extlinux
# (the bootable Cinder volume has no Glance behind it). Separate from .venv and .venv-cinder
# because Nova pins its own stack. The repo is installed editable into it (nova-compute loads
# api_ext.nova_driver), with its own dependencies held to the versions Nova brought.
# Fast no-op when everything is in place.
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV="$REPO/.venv-nova"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
PIP="$VENV/bin/pip"

missing=""
for p in extlinux syslinux-common mariadb-server mariadb-client e2fsprogs util-linux; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "nova_setup: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # no systemd here: the package's own server is not started; the bed runs its own mariadbd
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

run_pip() {
    log=$(mktemp)
    if ! "$PIP" install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"; echo "nova_setup: pip install $* failed" >&2; exit 1
    fi
    rm -f "$log"
}

if ! { [ -x "$VENV/bin/nova-manage" ] && [ -x "$VENV/bin/placement-manage" ] \
    && "$VENV/bin/python" -c 'import nova.virt.libvirt.driver, placement.deploy, pymysql, libvirt, novaclient' 2>/dev/null; }; then
    "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
        echo "nova_setup: Nova needs Python >= 3.11 ($PY is older)" >&2; exit 1; }
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    echo '*' > "$VENV/.gitignore"  # keeps git, and ruff (which honours .gitignore), out
    rm -f "$VENV/.repo-stamp"
    run_pip "nova==34.0.0" "openstack-placement==16.0.0" "libvirt-python==9.0.0" \
        python-novaclient python-cinderclient pymysql
fi

# The repo, editable; its dependencies may add packages (zstandard, qemu.qmp...) but never
# move one Nova installed. Redone when pyproject.toml changes.
stamp=$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)
if [ "$(cat "$VENV/.repo-stamp" 2>/dev/null)" != "$stamp" ]; then
    pins=$(mktemp)
    "$PIP" freeze --disable-pip-version-check --exclude-editable | grep -v '^qsnap' > "$pins"
    run_pip -c "$pins" -e "$REPO"
    rm -f "$pins"
    "$VENV/bin/python" -W ignore -c 'import nova.virt.libvirt.driver, placement.deploy, api_ext, qcow2'
    echo "$stamp" > "$VENV/.repo-stamp"
    echo "nova_setup: $("$VENV/bin/python" -c 'import importlib.metadata as m; print("nova", m.version("nova"), "placement", m.version("openstack-placement"))') in $VENV"
fi

# qsnap's driver where Nova loads drivers from (nova/virt/qsnap.py), as an operator installs it
# (README "Deployment with Nova and Cinder"); a no-op when current.
"$VENV/bin/python" -W ignore -m api_ext.nova_shim install --check >/dev/null 2>&1 \
    || "$VENV/bin/python" -W ignore -m api_ext.nova_shim install
