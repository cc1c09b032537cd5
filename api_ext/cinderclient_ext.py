"""python-cinderclient extension for qsnap's Cinder API extension (api_ext.cinder_extension).

Use: ``Client(..., extensions=[Extension("qsnap_snapshots", cinderclient_ext)])``, then
``client.qsnap_snapshots.create_metadata(...)``. The code lives in ``hostagent.cinder.records``
(the agent makes these calls and may not import api_ext/); this module re-exports it so
cinderclient users keep one stable module. cinderclient binds a module's last
``base.Manager`` subclass: exactly one is re-exported here.
"""

from __future__ import annotations

from hostagent.cinder.records import (
    CREATE,
    DELETE,
    FINALIZE,
    ActiveFile,
    QsnapSnapshotManager,
    create_body,
    delete_body,
    finalize_body,
)

__all__ = [
    "CREATE",
    "DELETE",
    "FINALIZE",
    "ActiveFile",
    "QsnapSnapshotManager",
    "create_body",
    "delete_body",
    "finalize_body",
]
