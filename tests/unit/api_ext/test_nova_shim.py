"""``python -m api_ext.nova_shim install [--check]``: the module that lets Nova load qsnap's
driver from ``nova.virt``, written atomically and only when it differs."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

from api_ext import nova_shim
from api_ext.nova_shim import MODULE_NAME, SHIM, ShimError, install, main, nova_virt_dir, problem


@pytest.fixture
def virt(tmp_path: Path) -> Path:
    d = tmp_path / "nova" / "virt"
    d.mkdir(parents=True)
    return d


def test_the_shim_only_imports_the_driver_class() -> None:
    tree = ast.parse(SHIM)
    assert len(tree.body) == 1
    imp = tree.body[0]
    assert isinstance(imp, ast.ImportFrom) and imp.module == "api_ext.nova_driver"
    assert [a.name for a in imp.names] == ["QsnapLibvirtDriver"] and imp.names[0].asname is None


def test_install_writes_the_shim_then_leaves_it_alone(virt: Path) -> None:
    old_umask = os.umask(0o077)  # an installer's strict umask must not hide it from nova
    try:
        assert install(virt) is True
    finally:
        os.umask(old_umask)
    path = virt / MODULE_NAME
    assert path.read_text() == SHIM and path.stat().st_mode & 0o777 == 0o644
    before = os.stat(path)
    assert install(virt) is False
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in virt.iterdir()) == [MODULE_NAME]


def test_install_replaces_a_different_file_whole(virt: Path) -> None:
    (virt / MODULE_NAME).write_text("from elsewhere import Driver\n")
    assert problem(virt) == f"{virt / MODULE_NAME} differs from qsnap's shim"
    assert install(virt) is True
    assert (virt / MODULE_NAME).read_text() == SHIM and problem(virt) is None
    assert sorted(p.name for p in virt.iterdir()) == [MODULE_NAME]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    virt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (virt / MODULE_NAME).write_text("old\n")

    def no_replace(src: str, dst: str) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(nova_shim.os, "replace", no_replace)
    with pytest.raises(ShimError, match=r"cannot write .*Read-only file system"):
        install(virt)
    assert (virt / MODULE_NAME).read_text() == "old\n"
    assert sorted(p.name for p in virt.iterdir()) == [MODULE_NAME]


def test_check_fails_when_missing_or_different_and_passes_when_current(
    virt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    check = ["install", "--check", "--virt-dir", str(virt)]
    assert main(check) == 1
    assert "is missing" in capsys.readouterr().err
    assert not (virt / MODULE_NAME).exists()  # --check never writes
    (virt / MODULE_NAME).write_text(SHIM + "# edited\n")
    assert main(check) == 1
    assert "differs" in capsys.readouterr().err
    assert main(["install", "--virt-dir", str(virt)]) == 0
    assert "written" in capsys.readouterr().out
    assert main(check) == 0
    assert main(["install", "--virt-dir", str(virt)]) == 0
    assert "already current" in capsys.readouterr().out


def test_nova_virt_is_found_on_the_path_without_importing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "nova"
    (pkg / "virt").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "virt" / "__init__.py").write_text("raise RuntimeError('nova.virt imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("nova", "nova.virt"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        assert nova_virt_dir() == pkg / "virt"
        assert "nova.virt" not in sys.modules
    finally:
        sys.modules.pop("nova", None)


def test_no_nova_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.delitem(sys.modules, "nova", raising=False)
    with pytest.raises(ShimError, match="nova is not installed"):
        nova_virt_dir()
    assert main(["install", "--check"]) == 1
    assert "run this with nova's Python" in capsys.readouterr().err
