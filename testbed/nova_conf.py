"""Files of the Nova peer: nova.conf, placement.conf, api-paste.ini, launchers and PATH shims.

Kept apart from the process code (testbed/nova_services.py) so what the bed configures can be
read in one place. The values are the ones seen working on this machine kind (nova.md);
``extra`` groups merge over them (``extra_nova_conf``: e.g. a ``[qsnap]`` group for a driver
that registers one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from testbed.service import write_conf

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-nova"
STOCK_DRIVER = "libvirt.LibvirtDriver"

# Any threaded WSGI server will do; wsgiref keeps the bed free of another dependency. Nova's
# and Placement's init_application parse sys.argv: reset it before the import.
WSGI_LAUNCHER = """\
import importlib, socketserver, sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
target, port = sys.argv[1], int(sys.argv[2])
sys.argv = sys.argv[:1]
module, _, attr = target.partition(":")
app = getattr(importlib.import_module(module), attr)
class Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 64
class Handler(WSGIRequestHandler):
    def log_message(self, *args):
        pass
make_server("127.0.0.1", port, app, server_class=Server, handler_class=Handler).serve_forever()
"""

# nova-compute as shipped, with two test-bed changes made in this process only:
# - qemu:///system also runs other tests' domains, which a new compute service refuses to
#   start beside ("My hypervisor has existing instances"): that check is disabled;
# - Nova loads compute_driver as ``nova.virt.<value>``: ``qsnap.QsnapLibvirtDriver`` is found
#   through the shim tools/nova_setup.sh installs as an operator does (``python -m
#   api_ext.nova_shim install``); a full dotted path (``api_ext.nova_driver.X``) is aliased
#   under nova.virt as it is.
COMPUTE_LAUNCHER = """\
import importlib, importlib.util, sys
from nova.cmd import compute  # applies Nova's (threading) concurrency set-up first
from nova.compute import manager
manager.ComputeManager._sanity_check_new_host = lambda self: None
driver = sys.argv.pop(1)
parts = driver.rpartition(".")[0].split(".")
if parts[0] and importlib.util.find_spec("nova.virt." + parts[0]) is None:
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if "nova.virt." + name not in sys.modules:
            sys.modules["nova.virt." + name] = importlib.import_module(name)
sys.exit(compute.main())
"""

# Privsep without rootwrap: Nova runs `sudo privsep-helper ...` (and never `sudo` otherwise
# with disable_rootwrap); we are root already.
SUDO_SHIM = '#!/bin/sh\ncase "$1" in *-rootwrap) shift 2;; esac\nexec "$@"\n'

# There is no kernel NFS client here: an NFS mount becomes a bind mount of the share, so
# os.path.ismount() is true afterwards (the share lives on its own filesystem) and Nova's
# mount manager counts its users as it would on a real NFS export.
MOUNT_SHIM = """\
#!/bin/sh
nfs=0
for a in "$@"; do case "$a" in nfs|nfs4) nfs=1;; esac; done
if [ "$nfs" = 1 ]; then
    for a in "$@"; do target=$a; done
    exec /bin/mount --bind '{share}' "$target"
fi
exec /bin/mount "$@"
"""


@dataclass(frozen=True)
class Ports:
    placement: int
    api: int


@dataclass(frozen=True)
class NovaFiles:
    """Paths of everything written by :func:`write_files`."""

    base: Path
    nova_conf: Path
    cell0_conf: Path
    placement_dir: Path
    bin: Path
    mnt: Path
    instances: Path
    logs: Path


def _with_extra(
    sections: dict[str, dict[str, object]], extra: Mapping[str, Mapping[str, object]]
) -> dict[str, dict[str, object]]:
    out = {g: dict(o) for g, o in sections.items()}
    for group, opts in extra.items():
        out[group] = {**out.get(group, {}), **opts}
    return out


def nova_sections(
    *,
    files: NovaFiles,
    host: str,
    name_template: str,
    transport_url: str,
    api_db: str,
    cell_db: str,
    ports: Ports,
    cinder_endpoint: str,
    project_id: str,
    neutron_url: str,
    compute_driver: str,
) -> dict[str, dict[str, object]]:
    """nova.conf as groups; ``cinder_endpoint`` is Cinder's ``.../v3`` (no project)."""
    token = f"admin:{project_id}"
    return {
        "DEFAULT": {
            "host": host,
            "my_ip": "127.0.0.1",
            "debug": "true",
            "state_path": files.base / "state",
            "instances_path": files.instances,
            "transport_url": transport_url,
            "compute_driver": compute_driver,
            "instance_name_template": name_template,
            # no ACPI handler in the test guest: a clean shutdown would wait 60 s for nothing
            "shutdown_timeout": 0,
            "heal_instance_info_cache_interval": -1,
            "graceful_shutdown_timeout": 5,
            # periodic tasks (the scheduler's host discovery, compute's resource reports)
            # start at once instead of after a random delay of up to 60 s
            "periodic_fuzzy_delay": 0,
            "report_interval": 2,
            "use_stderr": "false",
        },
        "workarounds": {"disable_rootwrap": "true"},
        "wsgi": {"api_paste_config": files.base / "api-paste.ini"},
        "api_database": {"connection": api_db, "max_pool_size": 5, "max_overflow": 10},
        "database": {"connection": cell_db, "max_pool_size": 5, "max_overflow": 10},
        "oslo_concurrency": {"lock_path": files.base / "lock"},
        # the scheduler maps new computes itself: no nova-manage discover_hosts round (4.6 s)
        "scheduler": {"discover_hosts_in_cells_interval": 2, "workers": 1},
        "conductor": {"workers": 1},
        "libvirt": {
            "virt_type": "qemu",
            "connection_uri": "qemu:///system",
            "cpu_mode": "none",
            "nfs_mount_point_base": files.mnt,
            "num_pcie_ports": 8,
        },
        "image_cache": {"manager_interval": -1},
        "vnc": {"enabled": "false"},
        "placement": {
            "auth_type": "admin_token",
            "endpoint": f"http://127.0.0.1:{ports.placement}",
            "token": "admin",
        },
        "cinder": {
            "auth_type": "admin_token",
            "endpoint": f"{cinder_endpoint}/{project_id}",
            "token": token,
            "endpoint_template": f"{cinder_endpoint}/%(project_id)s",
        },
        "neutron": {
            "auth_type": "admin_token",
            "endpoint": neutron_url,
            "endpoint_override": neutron_url,
            "token": token,
        },
        # no Glance: Nova only builds image URLs from it (notifications), never calls it
        "glance": {"endpoint_override": "http://127.0.0.1:9/image"},
        "oslo_messaging_rabbit": {"heartbeat_timeout_threshold": 0},
    }


def write_files(
    base: Path,
    *,
    share_dir: Path,
    sections: Mapping[str, Mapping[str, object]],
    extra: Mapping[str, Mapping[str, object]],
    placement_db: str,
    cell0_db: str,
) -> NovaFiles:
    """Write every file under ``base`` (0755: QEMU walks the instances and mount trees)."""
    files = NovaFiles(
        base=base,
        nova_conf=base / "nova.conf",
        cell0_conf=base / "nova-cell0.conf",
        placement_dir=base / "placement",
        bin=base / "bin",
        mnt=base / "mnt",
        instances=base / "instances",
        logs=base / "log",
    )
    for d in (files.bin, files.mnt, files.instances, files.logs, files.placement_dir,
              base / "state", base / "lock"):  # fmt: skip
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
    merged = _with_extra({g: dict(o) for g, o in sections.items()}, extra)
    write_conf(files.nova_conf, merged)
    # the cell0 schema is synced in parallel with cell1's: same file, cell0 as [database]
    cell0 = {g: dict(o) for g, o in merged.items()}
    cell0["database"] = {**cell0["database"], "connection": cell0_db}
    write_conf(files.cell0_conf, cell0)
    write_conf(
        files.placement_dir / "placement.conf",
        {
            "DEFAULT": {"debug": "false", "log_file": files.logs / "placement-api.log"},
            "api": {"auth_strategy": "noauth2"},
            "placement_database": {"connection": placement_db},
        },
    )
    paste = (VENV / "etc" / "nova" / "api-paste.ini").read_text()
    stock = "paste.filter_factory = keystonemiddleware.auth_token:filter_factory"
    if stock not in paste:
        raise RuntimeError("Nova's api-paste.ini has no authtoken filter to replace")
    (base / "api-paste.ini").write_text(
        paste.replace(stock, "paste.filter_factory = testbed.nova_auth:filter_factory")
    )
    (base / "wsgi_serve.py").write_text(WSGI_LAUNCHER)
    (base / "compute_launch.py").write_text(COMPUTE_LAUNCHER)
    for name, text in (("sudo", SUDO_SHIM), ("mount", MOUNT_SHIM.format(share=share_dir))):
        (files.bin / name).write_text(text)
        os.chmod(files.bin / name, 0o755)
    return files
