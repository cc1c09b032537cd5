#!/usr/bin/env python3
"""The import-layer contract of qsnap, checked by ``make lint`` (stdlib only, no dependency).

Usage: ``python tools/check_imports.py [--root DIR] [--no-probes]``; exit 1 with one line per
violation (``[rule] importer ... imported ...``), 0 with a one-line summary.

The contract is the declarative :data:`CONTRACT` below, not a file list: modules are found by
walking the packages and matched against patterns, so files that move or appear are checked
without editing this tool. A pattern ``a.b`` is that module; ``a.b.*`` is ``a.b`` and every
module below it; when several patterns match a module the most specific wins.

What "imports" means: the module-level import graph, parsed with :mod:`ast`. Imports inside
functions and under ``if TYPE_CHECKING:`` do not count; class bodies, ``try`` and plain ``if``
do. ``from pkg import mod`` imports ``pkg.mod`` when that module exists (else ``pkg``);
relative imports are resolved. Package ``__init__`` modules are nodes like any other. For
*reach* (rule ``forbidden``), importing ``a.b.c`` also runs ``a`` and ``a.b`` and so counts
their imports; for cycles and layers only the named module counts.

Rules:

- ``layers``: within a scope, a module may import its own layer or lower ones only; a module
  of the scope that no pattern assigns is itself a violation (place new modules explicitly).
- ``allow-only``: importers may import from a package only the listed modules (direct).
- ``stdlib-only``: the module imports the standard library only.
- ``forbidden``: the sources must not reach the targets, transitively (the chain is shown).
- ``cycle``: no strongly connected component (>1 module) in the module-level graph.
- ``size``: no ``.py`` file over ``max_lines`` lines in the size roots.
- ``import-time``: ``python -c "import M"`` (a real subprocess) must not load the named
  modules (the run-time twin of ``forbidden``: catches dynamic imports the graph cannot see).

Known violations of today's tree are listed in :data:`CONTRACT` ``exemptions`` with a reason;
they are reported as exempt, and an exemption that no longer matches anything is an error
(the list only shrinks).
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from import_contract import (  # tools/ is sys.path[0] when run as a script
    CONTRACT,
    AllowOnly,
    Contract,
    Exemption,
    Forbidden,
    ImportProbe,
    Layers,
    StdlibOnly,
)

# --------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Ref:
    target: str
    lineno: int


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    refs: list[Ref] = field(default_factory=list)  # module-level imports, resolved


def matches(pattern: str, name: str) -> bool:
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return name == base or name.startswith(base + ".")
    return name == pattern


def _specificity(pattern: str) -> tuple[int, int]:
    exact = not pattern.endswith(".*")
    return (pattern.removesuffix(".*").count(".") + 1, int(exact))


def best_match(patterns: Iterable[str], name: str) -> str | None:
    hits = [p for p in patterns if matches(p, name)]
    return max(hits, key=_specificity) if hits else None


def any_match(patterns: Iterable[str], name: str) -> bool:
    return any(matches(p, name) for p in patterns)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(body: Sequence[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements run at import time (not in functions, not under TYPE_CHECKING)."""
    for stmt in body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            yield stmt
        elif isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                yield from _module_level(stmt.body)
            yield from _module_level(stmt.orelse)
        elif isinstance(stmt, ast.Try | ast.TryStar):
            for block in (stmt.body, stmt.orelse, stmt.finalbody):
                yield from _module_level(block)
            for handler in stmt.handlers:
                yield from _module_level(handler.body)
        elif isinstance(stmt, ast.With | ast.For | ast.While):
            yield from _module_level(stmt.body)
            if not isinstance(stmt, ast.With):
                yield from _module_level(stmt.orelse)
        elif isinstance(stmt, ast.ClassDef):
            yield from _module_level(stmt.body)
        elif isinstance(stmt, ast.Match):
            for case in stmt.cases:
                yield from _module_level(case.body)


def discover(root: Path, packages: Iterable[str]) -> dict[str, Module]:
    mods: dict[str, Module] = {}
    for pkg in packages:
        base = root / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("").parts
            is_pkg = rel[-1] == "__init__"
            name = ".".join(rel[:-1] if is_pkg else rel)
            mods[name] = Module(name, path, is_pkg)
    for mod in mods.values():
        tree = ast.parse(mod.path.read_text(encoding="utf-8"), str(mod.path))
        for node in _module_level(tree.body):
            mod.refs.extend(_resolve(mod, node, mods))
    return mods


def _resolve(mod: Module, node: ast.Import | ast.ImportFrom, mods: dict[str, Module]) -> list[Ref]:
    if isinstance(node, ast.Import):
        return [Ref(a.name, node.lineno) for a in node.names]
    if node.level:
        parts = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*parts, *([node.module] if node.module else [])])
    else:
        base = node.module or ""
    if base == "__future__":
        return []
    refs: list[Ref] = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        refs.append(Ref(sub if sub in mods else base, node.lineno))
    return refs


def edges(mods: dict[str, Module]) -> dict[str, set[str]]:
    """First-party module -> first-party modules it names (no implicit parents, no self)."""
    return {
        m.name: {r.target for r in m.refs if r.target in mods and r.target != m.name}
        for m in mods.values()
    }


# --------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Violation:
    rule: str
    key: str
    message: str

    def line(self) -> str:
        return f"[{self.rule}] {self.message}"


def _where(mod: Module, lineno: int, root: Path) -> str:
    try:
        rel = mod.path.relative_to(root)
    except ValueError:
        rel = mod.path
    return f"{rel}:{lineno}"


def check_layers(spec: Layers, mods: dict[str, Module], root: Path) -> list[Violation]:
    rule = f"layers:{spec.name}"
    index = {p: i for i, layer in enumerate(spec.layers) for p in layer}
    out: list[Violation] = []

    def layer_of(name: str) -> int | None:
        pat = best_match(index, name)
        return None if pat is None else index[pat]

    for mod in mods.values():
        if not any_match(spec.scope, mod.name):
            continue
        mine = layer_of(mod.name)
        if mine is None:
            out.append(
                Violation(
                    rule,
                    f"unassigned {mod.name}",
                    f"{mod.name} is in no layer of contract {spec.name!r}: "
                    "add it to a layer in tools/check_imports.py",
                )
            )
            continue
        for ref in mod.refs:
            if ref.target not in mods or not any_match(spec.scope, ref.target):
                continue
            theirs = layer_of(ref.target)
            if theirs is not None and theirs > mine:
                out.append(
                    Violation(
                        rule,
                        f"{mod.name} -> {ref.target}",
                        f"{mod.name} imports {ref.target}, a higher layer "
                        f"({theirs} > {mine}) at {_where(mod, ref.lineno, root)}",
                    )
                )
    return out


def check_allow_only(spec: AllowOnly, mods: dict[str, Module], root: Path) -> list[Violation]:
    rule = f"allow-only:{spec.name}"
    out: list[Violation] = []
    for mod in mods.values():
        if not any_match(spec.importers, mod.name):
            continue
        for ref in mod.refs:
            if any_match(spec.within, ref.target) and ref.target not in spec.allowed:
                out.append(
                    Violation(
                        rule,
                        f"{mod.name} -> {ref.target}",
                        f"{mod.name} imports {ref.target}; allowed from "
                        f"{', '.join(spec.within)}: {', '.join(spec.allowed)} "
                        f"at {_where(mod, ref.lineno, root)}",
                    )
                )
    return out


def check_stdlib_only(spec: StdlibOnly, mods: dict[str, Module], root: Path) -> list[Violation]:
    rule = f"stdlib-only:{spec.name}"
    out: list[Violation] = []
    for mod in mods.values():
        if not any_match(spec.modules, mod.name):
            continue
        for ref in mod.refs:
            if ref.target.split(".")[0] not in sys.stdlib_module_names:
                out.append(
                    Violation(
                        rule,
                        f"{mod.name} -> {ref.target}",
                        f"{mod.name} imports {ref.target}, not the standard library, "
                        f"at {_where(mod, ref.lineno, root)}",
                    )
                )
    return out


def check_forbidden(spec: Forbidden, mods: dict[str, Module], root: Path) -> list[Violation]:
    """BFS from each source over first-party modules (with the parents that importing runs)."""
    rule = f"forbidden:{spec.name}"
    out: list[Violation] = []
    for src in sorted(mods):
        is_src = any_match(spec.sources, src) or (
            mods[src].is_package and any_match(spec.package_sources, src)
        )
        if not is_src:
            continue
        start = [a for a in _ancestors(src) if a in mods] + [src]
        parent: dict[str, str | None] = dict.fromkeys(start)
        queue = deque(start)
        found: dict[str, tuple[str, str, int]] = {}  # pattern -> (hit, importer, line)
        while queue:
            cur = queue.popleft()
            for ref in mods[cur].refs:
                hit = best_match(spec.targets, ref.target)
                if hit is not None:
                    found.setdefault(hit, (ref.target, cur, ref.lineno))
                    continue
                if ref.target not in mods:
                    continue
                for nxt in [*(a for a in _ancestors(ref.target) if a in mods), ref.target]:
                    if nxt in parent:
                        continue
                    hit = best_match(spec.targets, nxt)
                    if hit is not None:
                        found.setdefault(hit, (nxt, cur, ref.lineno))
                        continue
                    parent[nxt] = cur
                    queue.append(nxt)
        for target, via, lineno in sorted(found.values()):
            chain = [target]
            node: str | None = via
            while node is not None:
                chain.append(node)
                node = parent[node]
            chain.reverse()
            out.append(
                Violation(
                    rule,
                    f"{src} -> {target}",
                    f"{src} reaches {target}: {' -> '.join(chain)} "
                    f"(last hop at {_where(mods[via], lineno, root)})",
                )
            )
    return out


def _sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp: list[str] = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                out.append(sorted(comp))
    return out


def _cycle_path(comp: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle through comp[0], inside the component."""
    members, first = set(comp), comp[0]
    parent: dict[str, str] = {}
    queue = deque([first])
    while queue:
        cur = queue.popleft()
        for nxt in sorted(graph[cur] & members):
            if nxt == first:
                path = [cur]
                while path[-1] != first:
                    path.append(parent[path[-1]])
                return [*reversed(path), first]
            if nxt not in parent:
                parent[nxt] = cur
                queue.append(nxt)
    return [*comp, first]  # unreachable for a real SCC


def check_cycles(mods: dict[str, Module]) -> list[Violation]:
    graph = edges(mods)
    return [
        Violation(
            "cycle",
            ", ".join(comp),
            f"import cycle among {', '.join(comp)}: {' -> '.join(_cycle_path(comp, graph))}",
        )
        for comp in _sccs(graph)
        if len(comp) > 1
    ]


def check_size(root: Path, size_roots: Iterable[str], max_lines: int) -> list[Violation]:
    out: list[Violation] = []
    for top in size_roots:
        for path in sorted((root / top).rglob("*.py")):
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > max_lines:
                rel = path.relative_to(root).as_posix()
                out.append(Violation("size", rel, f"{rel} has {n} lines (max {max_lines})"))
    return out


def run_probes(
    root: Path, probes: Iterable[ImportProbe], python: str = sys.executable
) -> list[Violation]:
    """``python -c "import M"`` in subprocesses (in parallel): M must not load ``absent``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.pop("PYTHONSAFEPATH", None)
    running = []
    for probe in probes:
        code = (
            f"import sys\nimport {probe.module}\n"
            f"bad = [m for m in {probe.absent!r} if m in sys.modules]\n"
            "print(' '.join(bad))\nsys.exit(3 if bad else 0)\n"
        )
        proc = subprocess.Popen(
            [python, "-c", code],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        running.append((probe, proc))
    out: list[Violation] = []
    for probe, proc in running:
        stdout, stderr = proc.communicate(timeout=300)
        if proc.returncode == 0:
            continue
        if proc.returncode == 3:
            what = f"loads {stdout.strip()}"
        else:
            last = (stderr.strip().splitlines() or ["no output"])[-1]
            what = f"fails (exit {proc.returncode}): {last}"
        out.append(
            Violation(
                "import-time",
                probe.module,
                f'python -c "import {probe.module}" {what} (must not load '
                f"{', '.join(probe.absent)})",
            )
        )
    return out


@dataclass
class Report:
    violations: list[Violation]
    exempted: list[tuple[Violation, Exemption]]
    modules: int


def check_test_imports(root: Path, trees: Iterable[str]) -> list[Violation]:
    """No module imports a test module (``test_*``, ``conftest``), at any level; code outside
    ``tests/`` (the demo, benches, test bed) imports nothing of ``tests``. Shared test code
    lives in helper modules, fixtures or ``testbed/``."""
    out: list[Violation] = []
    for tree in trees:
        base = root / tree
        for path in sorted(base.rglob("*.py")) if base.is_dir() else ():
            rel = path.relative_to(root).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), rel)):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                for name in names:
                    leaf = name.rsplit(".", 1)[-1]
                    first = name.split(".", 1)[0]
                    bad = first == "tests" and (leaf.startswith("test_") or leaf == "conftest")
                    outside = first == "tests" and tree != "tests"
                    if bad or outside:
                        why = "a test module" if bad else "tests (outside tests/)"
                        key = f"{rel} -> {name}"
                        out.append(
                            Violation(
                                "test-imports",
                                key,
                                f"{rel}:{getattr(node, 'lineno', 0)} imports {why}: {name}",
                            )
                        )
                        break
    return out


def check(root: Path, contract: Contract = CONTRACT, probes: bool = True) -> Report:
    mods = discover(root, contract.packages)
    found: list[Violation] = []
    for lay in contract.layers:
        found += check_layers(lay, mods, root)
    for allow in contract.allow_only:
        found += check_allow_only(allow, mods, root)
    for std in contract.stdlib_only:
        found += check_stdlib_only(std, mods, root)
    seen: set[str] = set()
    for forb in contract.forbidden:
        for v in check_forbidden(forb, mods, root):
            if v.key not in seen:  # one line per (source, target) across rules
                seen.add(v.key)
                found.append(v)
    found += check_cycles(mods)
    found += check_size(root, contract.size_roots, contract.max_lines)
    found += check_test_imports(root, contract.test_trees)
    if probes:
        found += run_probes(root, contract.probes)

    exempt = {(e.rule, e.key): e for e in contract.exemptions}
    used: set[tuple[str, str]] = set()
    report = Report([], [], len(mods))
    for v in found:
        ex = exempt.get((v.rule, v.key))
        if ex is None:
            report.violations.append(v)
        else:
            used.add((ex.rule, ex.key))
            report.exempted.append((v, ex))
    for key, ex in exempt.items():
        if key not in used and (probes or ex.rule != "import-time"):
            report.violations.append(
                Violation(
                    "stale-exemption",
                    ex.key,
                    f"exemption {ex.rule} {ex.key!r} matches nothing any more: "
                    "remove it from tools/check_imports.py",
                )
            )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--no-probes", action="store_true", help="skip the import-time subprocesses")
    args = ap.parse_args(argv)
    root: Path = args.root.resolve()
    report = check(root, CONTRACT, probes=not args.no_probes)
    for v, ex in report.exempted:
        print(f"exempt: {v.line()} -- {ex.reason}")
    for v in report.violations:
        print(v.line())
    if report.violations:
        print(f"check_imports: {len(report.violations)} violation(s)", file=sys.stderr)
        return 1
    print(
        f"check_imports: OK ({report.modules} modules, {len(report.exempted)} known exemption(s))"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
