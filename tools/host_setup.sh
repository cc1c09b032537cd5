#!/bin/bash
# Idempotent host preparation for qsnap's tests and demo (Debian 12, root, no systemd).
# Installs only missing Debian packages, (re)creates the venv when pyproject.toml changed,
# and starts virtlogd/libvirtd when they are not running. Fast (< 3 s) when all is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(qemu-system-x86 qemu-utils qemu-guest-agent libvirt-daemon-system libvirt-clients
      libvirt-dev pkg-config gcc libc6-dev busybox-static cpio kmod e2fsprogs
      glusterfs-server glusterfs-client rabbitmq-server libnbd-bin zstd procps iproute2
      psmisc python3-venv lz4)

# One dpkg-query for all packages (fast path when everything is installed): a package is
# missing unless dpkg reports it "installed"; unknown ones are not listed at all.
declare -A installed=()
while read -r name status; do
    [[ "$status" == "installed" ]] && installed[$name]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PKGS[@]}" 2>/dev/null || true)
missing=()
for p in "${PKGS[@]}"; do
    [[ -n "${installed[$p]-}" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "host-setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv: rebuilt when pyproject.toml changes (stamp = its hash).
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    for cand in python3.11 python3; do
        if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            PY=$(command -v "$cand"); break
        fi
    done
fi
[[ -n "$PY" ]] || { echo "host-setup: Python 3.11 not found" >&2; exit 1; }
stamp=$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -x .venv/bin/python || "$(cat .venv/.stamp 2>/dev/null)" != "$stamp" ]]; then
    echo "host-setup: building venv with $PY"
    [[ -x .venv/bin/python ]] || "$PY" -m venv .venv
    log=$(mktemp)
    if ! { .venv/bin/pip install -q -U pip wheel && .venv/bin/pip install -q -e '.[test,lint]'; } >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"; echo "host-setup: pip install failed" >&2; exit 1
    fi
    rm -f "$log"
    echo "$stamp" > .venv/.stamp
fi

# A real Cinder (PyPI) in its own venv, as a test peer. The stamp keeps the no-op < 0.1 s
# (importing Cinder to check takes ~3 s).
if [[ ! -f .venv-cinder/.qsnap-ok ]]; then
    echo "host-setup: installing Cinder test peer into .venv-cinder (~2 min)"
    tools/cinder_setup.sh
    touch .venv-cinder/.qsnap-ok
fi

# A real Nova + Placement (PyPI) in .venv-nova, with a private MariaDB and extlinux from
# Debian, as a test peer (testbed/nova.py). The repo is installed into it too, so the stamp
# is pyproject.toml's hash (a new dependency reaches nova-compute).
if [[ "$(cat .venv-nova/.qsnap-ok 2>/dev/null)" != "$stamp" ]]; then
    echo "host-setup: installing Nova test peer into .venv-nova (~1-2 min)"
    tools/nova_setup.sh
    echo "$stamp" > .venv-nova/.qsnap-ok
fi

# Without udev, /dev/kvm stays root-only 0600. libvirt then probes QEMU with KVM (root can
# open it) but finds KVM unusable for the libvirt-qemu user, declares its capability cache
# stale and re-probes on EVERY domain start (seen: createXML 4-5 minutes). Debian's udev
# rule makes it root:kvm 0660; do the same. Guests still run TCG (<domain type='qemu'>).
if [[ -c /dev/kvm ]] && [[ "$(stat -c %G:%a /dev/kvm)" != "kvm:660" ]]; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

# Daemons (no systemd here): virtlogd first, or libvirtd cannot start QEMU.
if ! pgrep -x virtlogd >/dev/null; then virtlogd -d; fi
if ! pgrep -x libvirtd >/dev/null; then
    libvirtd -d
fi
for _ in $(seq 1 300); do
    virsh -q -c qemu:///system uri >/dev/null 2>&1 && break
    sleep 0.1
done
virsh -q -c qemu:///system uri >/dev/null || { echo "host-setup: libvirtd not answering" >&2; exit 1; }
# QEMU runs as libvirt-qemu: the test tree must be traversable.
install -d -m 0755 /var/lib/qsnap-test /var/cache/qsnap-testbed
