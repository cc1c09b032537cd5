"""tools/check_imports.py: each rule bites on a tiny synthetic tree; the real repo passes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[3]


def _load() -> ModuleType:
    if str(REPO / "tools") not in sys.path:  # check_imports imports its sibling import_contract
        sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location("check_imports", REPO / "tools/check_imports.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_imports"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


ci = _load()

# low < mid < top; inside mid: [mid, mid.base] < [mid.pure.*] < [mid.svc] < [mid.app].
# fakevirt plays libvirt; low.virt plays libvirt_ops.
CLEAN = {
    "fakevirt.py": "",
    "low/__init__.py": "",
    "low/virt.py": "import fakevirt\n",
    "low/fmt.py": "import json\n",
    "mid/__init__.py": "",
    "mid/base.py": "import enum\n",
    "mid/pure/__init__.py": "from mid.pure import core\n",
    "mid/pure/core.py": "from low import fmt\nfrom mid import base\n",
    "mid/svc.py": "from low import virt\nfrom mid import base\n",
    "mid/app.py": "from mid import svc\nfrom mid.pure import core\n",
    "top/__init__.py": "",
    "top/cli.py": "from mid.pure import core\n",
}


def contract(**kw: object) -> object:
    base: dict[str, object] = dict(
        packages=("low", "mid", "top"),
        size_roots=("low", "mid", "top"),
        max_lines=20,
        layers=(
            ci.Layers(
                "packages", ("low.*", "mid.*", "top.*"), (("low.*",), ("mid.*",), ("top.*",))
            ),
            ci.Layers(
                "mid",
                ("mid.*",),
                (("mid", "mid.base"), ("mid.pure.*",), ("mid.svc",), ("mid.app",)),
            ),
        ),
        allow_only=(ci.AllowOnly("top-uses-pure", ("top.*",), ("mid.*",), ("mid.pure.core",)),),
        stdlib_only=(ci.StdlibOnly("base", ("mid.base",)),),
        forbidden=(
            ci.Forbidden(
                "no-virt",
                targets=("fakevirt.*", "low.virt.*"),
                sources=("mid.pure.*", "top.cli"),
                package_sources=("mid.*",),
            ),
        ),
        probes=(ci.ImportProbe("top.cli", ("fakevirt",)),),
    )
    base.update(kw)
    return ci.Contract(**base)


def tree(tmp_path: Path, changes: dict[str, str] | None = None) -> Path:
    """CLEAN with some files replaced or added."""
    files = {**CLEAN, **(changes or {})}
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def lines(root: Path, probes: bool = False, **kw: object) -> list[str]:
    report = ci.check(root, contract(**kw), probes=probes)
    return [v.line() for v in report.violations]


def test_clean_tree_passes_with_probes(tmp_path: Path) -> None:
    assert lines(tree(tmp_path), probes=True) == []


def test_up_arrow_between_packages(tmp_path: Path) -> None:
    out = lines(tree(tmp_path, {"low/fmt.py": "import json\nfrom mid import base\n"}))
    assert out == [
        "[layers:packages] low.fmt imports mid.base, a higher layer (1 > 0) at low/fmt.py:2"
    ]


def test_up_arrow_inside_a_package(tmp_path: Path) -> None:
    out = lines(tree(tmp_path, {"mid/pure/core.py": "from mid import base, svc\n"}))
    assert "[layers:mid] mid.pure.core imports mid.svc, a higher layer (2 > 1)" in out[0]
    # the same import lets the pure module reach the hypervisor: reported with its chain
    assert any(
        "[forbidden:no-virt] mid.pure.core reaches low.virt: mid.pure.core -> mid.svc -> low.virt"
        in x
        for x in out
    )


def test_module_in_no_layer(tmp_path: Path) -> None:
    out = lines(tree(tmp_path, {"mid/new.py": ""}))
    assert out == [
        "[layers:mid] mid.new is in no layer of contract 'mid': "
        "add it to a layer in tools/check_imports.py"
    ]


def test_allow_only(tmp_path: Path) -> None:
    out = lines(tree(tmp_path, {"top/cli.py": "from mid.pure import core\nfrom mid import base\n"}))
    assert out == [
        "[allow-only:top-uses-pure] top.cli imports mid.base; allowed from mid.*: "
        "mid.pure.core at top/cli.py:2"
    ]


def test_stdlib_only(tmp_path: Path) -> None:
    out = lines(tree(tmp_path, {"mid/base.py": "import enum\nimport low.fmt\n"}))
    assert out == [
        "[stdlib-only:base] mid.base imports low.fmt, not the standard library, at mid/base.py:2"
    ]


def test_cycle_from_import_counts_submodule(tmp_path: Path) -> None:
    out = lines(
        tree(tmp_path, {"low/a.py": "from low import b\n", "low/b.py": "from low import a\n"})
    )
    assert out == ["[cycle] import cycle among low.a, low.b: low.a -> low.b -> low.a"]


def test_cycle_through_package_init(tmp_path: Path) -> None:
    # mid/pure/__init__ imports core; core imports a name from the package itself
    out = lines(tree(tmp_path, {"mid/pure/core.py": "from mid.pure import thing\n"}))
    assert out == [
        "[cycle] import cycle among mid.pure, mid.pure.core: mid.pure -> mid.pure.core -> mid.pure"
    ]


def test_function_and_type_checking_imports_do_not_count(tmp_path: Path) -> None:
    b = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from low import a\n"
        "def f() -> None:\n    from low import a  # noqa\n"
    )
    assert lines(tree(tmp_path, {"low/a.py": "from low import b\n", "low/b.py": b})) == []


def test_forbidden_reach_is_transitive_and_names_the_chain(tmp_path: Path) -> None:
    out = lines(tree(tmp_path, {"low/fmt.py": "import json\nfrom low import virt\n"}))
    assert out == [
        "[forbidden:no-virt] mid.pure reaches low.virt: mid.pure -> mid.pure.core -> low.fmt "
        "-> low.virt (last hop at low/fmt.py:2)",
        "[forbidden:no-virt] mid.pure.core reaches low.virt: mid.pure.core -> low.fmt "
        "-> low.virt (last hop at low/fmt.py:2)",
        "[forbidden:no-virt] top.cli reaches low.virt: top.cli -> mid.pure.core -> low.fmt "
        "-> low.virt (last hop at low/fmt.py:2)",
    ]


def test_forbidden_reach_counts_the_parent_packages_import_runs(tmp_path: Path) -> None:
    # importing mid.pure.core runs mid/__init__ first: its imports count for reach
    out = lines(tree(tmp_path, {"mid/__init__.py": "import fakevirt\n"}))
    assert "[forbidden:no-virt] mid reaches fakevirt: mid -> fakevirt" in out[0]
    assert any(x.startswith("[forbidden:no-virt] top.cli reaches fakevirt: top.cli") for x in out)


def test_oversized_file(tmp_path: Path) -> None:
    out = lines(tree(tmp_path, {"low/fmt.py": "x = 1\n" * 21}))
    assert out == ["[size] low/fmt.py has 21 lines (max 20)"]


def test_test_modules_are_not_libraries(tmp_path: Path) -> None:
    helpers = {
        "tests/__init__.py": "",
        "tests/unit/__init__.py": "",
        "tests/unit/fakes.py": "",
        "tests/unit/test_a.py": "from tests.unit.fakes import x\n",  # a helper module: fine
    }
    assert lines(tree(tmp_path, helpers), test_trees=("tests", "bench")) == []
    bad = {
        "tests/unit/test_b.py": "def f():\n    from tests.unit.test_a import y\n",
        "tests/unit/test_c.py": "from tests.unit import conftest\n",
        "bench/b.py": "from tests.unit.fakes import x\n",
    }
    out = lines(tree(tmp_path, {**helpers, **bad}), test_trees=("tests", "bench"))
    assert out == [
        "[test-imports] tests/unit/test_b.py:2 imports a test module: tests.unit.test_a",
        "[test-imports] tests/unit/test_c.py:1 imports a test module: tests.unit.conftest",
        "[test-imports] bench/b.py:1 imports tests (outside tests/): tests.unit.fakes",
    ]


def test_import_time_probe_sees_what_the_graph_cannot(tmp_path: Path) -> None:
    dynamic = "import importlib\nimportlib.import_module('fakevirt')\n"
    root = tree(tmp_path, {"low/fmt.py": dynamic})
    assert lines(root) == []  # statically clean
    assert lines(root, probes=True) == [
        '[import-time] python -c "import top.cli" loads fakevirt (must not load fakevirt)'
    ]


def test_import_time_probe_reports_a_failing_import(tmp_path: Path) -> None:
    out = lines(tree(tmp_path, {"low/fmt.py": "raise RuntimeError('boom')\n"}), probes=True)
    assert out == [
        '[import-time] python -c "import top.cli" fails (exit 1): RuntimeError: boom '
        "(must not load fakevirt)"
    ]


def test_exemption_silences_and_a_stale_one_is_an_error(tmp_path: Path) -> None:
    root = tree(tmp_path, {"low/fmt.py": "x = 1\n" * 21})
    ok = ci.Exemption("size", "low/fmt.py", "being split")
    stale = ci.Exemption("size", "low/gone.py", "split long ago")
    report = ci.check(root, contract(exemptions=(ok, stale)), probes=False)
    assert [v.line() for v, _ in report.exempted] == ["[size] low/fmt.py has 21 lines (max 20)"]
    assert [v.rule for v in report.violations] == ["stale-exemption"]


def test_patterns() -> None:
    assert ci.matches("a.*", "a") and ci.matches("a.*", "a.b.c")
    assert not ci.matches("a.*", "ab") and not ci.matches("a", "a.b")
    assert ci.best_match(["a.*", "a.b", "a.b.*"], "a.b") == "a.b"
    assert ci.best_match(["a.*", "a.b.*"], "a.b.c") == "a.b.*"


def test_real_repo_passes(capsys: pytest.CaptureFixture[str]) -> None:
    rc = ci.main(["--root", str(REPO)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "check_imports: OK" in out
