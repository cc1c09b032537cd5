"""qsnap's import-layer contract, declared (checked by ``tools/check_imports.py``).

Patterns: ``a.b`` is that module; ``a.b.*`` is ``a.b`` and every module below it; the most
specific pattern wins. Known violations go to ``exemptions`` with a reason (the list only
shrinks: an exemption that matches nothing is an error).
"""

from __future__ import annotations

from dataclasses import dataclass

# --------------------------------------------------------------------------- the contract


@dataclass(frozen=True)
class Layers:
    """Layers, lowest first; each layer is a tuple of patterns."""

    name: str
    scope: tuple[str, ...]
    layers: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class AllowOnly:
    """``importers`` may import, from modules matching ``within``, only ``allowed``."""

    name: str
    importers: tuple[str, ...]
    within: tuple[str, ...]
    allowed: tuple[str, ...]


@dataclass(frozen=True)
class StdlibOnly:
    name: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class Forbidden:
    """``sources`` (and the package ``__init__`` modules matching ``package_sources``) must not
    reach ``targets`` through module-level imports of first-party modules."""

    name: str
    targets: tuple[str, ...]
    sources: tuple[str, ...] = ()
    package_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImportProbe:
    module: str
    absent: tuple[str, ...]


@dataclass(frozen=True)
class Exemption:
    rule: str
    key: str
    reason: str


@dataclass(frozen=True)
class Contract:
    packages: tuple[str, ...]  # first-party top-level packages (the import graph)
    size_roots: tuple[str, ...]
    max_lines: int
    layers: tuple[Layers, ...] = ()
    allow_only: tuple[AllowOnly, ...] = ()
    stdlib_only: tuple[StdlibOnly, ...] = ()
    forbidden: tuple[Forbidden, ...] = ()
    probes: tuple[ImportProbe, ...] = ()
    exemptions: tuple[Exemption, ...] = ()
    #: Trees where no module may import a test module (and only tests/ may import tests).
    test_trees: tuple[str, ...] = ()


_LIBVIRT = ("libvirt.*", "libvirt_qemu.*", "libvirt_ops.*")

CONTRACT = Contract(
    packages=("qcow2", "libvirt_ops", "hostagent", "api_ext", "testbed"),
    size_roots=("qcow2", "libvirt_ops", "hostagent", "api_ext", "testbed"),
    max_lines=600,
    layers=(
        Layers(
            "packages",
            scope=("qcow2.*", "libvirt_ops.*", "hostagent.*", "api_ext.*"),
            layers=(("qcow2.*",), ("libvirt_ops.*",), ("hostagent.*",), ("api_ext.*",)),
        ),
        Layers(
            "hostagent",
            scope=("hostagent.*",),
            layers=(
                # package containers import nothing of hostagent; errors is the root
                ("hostagent", "hostagent.rpc", "hostagent.backup", "hostagent.errors"),
                ("hostagent.journal.model",),
                (
                    "hostagent.rpc.contract",
                    "hostagent.rpc.agent_service",
                    "hostagent.rpc.messaging",
                    "hostagent.rpc.nova_side",
                ),
                ("hostagent.journal.*", "hostagent.pool", "hostagent.config"),
                # the resume registry: orders the work, each kind registers its resume
                ("hostagent.recovery",),
                ("hostagent.cinder.*", "hostagent.nova_records"),
                ("hostagent.backup.repo.*",),
                # lower errors -> wire errors: under the backup service and the endpoint
                ("hostagent.rpc.wire_errors",),
                ("hostagent.hypervisor", "hostagent.inventory"),
                ("hostagent.backup.online",),
                ("hostagent.snapshots.*",),
                ("hostagent.backup.*",),  # live, create, service, legacy, and new ones
                # the adapter implementing the Protocol: wiring, imported by the agent only
                ("hostagent.libvirt_hypervisor",),
                ("hostagent.service",),
                ("hostagent.rpc.server", "hostagent.rpc.client"),
                ("hostagent.agent", "hostagent.cli"),
            ),
        ),
    ),
    allow_only=(
        AllowOnly(
            "api_ext-uses-rpc",
            importers=("api_ext.*",),
            within=("hostagent.*",),
            allowed=(
                "hostagent.rpc",
                "hostagent.rpc.contract",
                "hostagent.rpc.client",
                # served inside nova-compute by api_ext.nova_agent/nova_driver
                "hostagent.rpc.nova_side",
                "hostagent.config",
                "hostagent.cinder.records",
            ),
        ),
        AllowOnly(
            "contract-is-leaf",
            importers=("hostagent.rpc.contract",),
            within=("hostagent.*",),
            allowed=("hostagent.journal.model", "hostagent.errors"),
        ),
    ),
    stdlib_only=(StdlibOnly("stdlib-only", ("hostagent.journal.model", "hostagent.errors")),),
    forbidden=(
        Forbidden(
            "no-libvirt",
            targets=_LIBVIRT,
            sources=(
                "qcow2.*",
                "hostagent.rpc.contract",
                "hostagent.journal.*",
                "api_ext.cli",
                "api_ext.cinderclient_ext",
            ),
            package_sources=("hostagent.*",),
        ),
        Forbidden(
            "pure-repo",
            targets=(*_LIBVIRT, "hostagent.journal.*"),
            sources=("hostagent.backup.repo.*",),
        ),
    ),
    probes=tuple(
        ImportProbe(m, ("libvirt", "libvirt_qemu", "libvirt_ops"))
        for m in ("hostagent", "hostagent.rpc.contract", "api_ext.cli", "api_ext.cinderclient_ext")
    ),
    exemptions=(),
    test_trees=("tests", "testbed", "demo", "bench"),
)
