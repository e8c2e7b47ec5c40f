"""The package's import graph: imports flow one way (no circle, also none through an
import inside a function), no module imports another module's private ``_names``, and the
wings import only downward (``WING_LEVELS``: modeling and data never import config,
checkpoint or engine; checkpoint never imports engine)."""

import ast
from pathlib import Path

import pytest

import hrnet_d2

PACKAGE = Path(hrnet_d2.__file__).resolve().parent


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, module: str) -> str:
    """Absolute name of ``from <level dots><module> import ...`` written in ``current``."""
    if level == 0:
        return module
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph(root: Path):
    """{module: {imported package module}} and [(module, line, imported private name)] for a
    package directory ``root``; every import counts, also those inside functions."""
    package = root.name
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph, private = {}, []
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node.level, node.module or "")
                targets = []
                for alias in node.names:
                    if f"{source}.{alias.name}" in files:  # ``from . import module``
                        targets.append((f"{source}.{alias.name}", None))
                    else:
                        targets.append((source, alias.name))
            else:
                continue
            for target, imported in targets:
                if target != package and not target.startswith(package + "."):
                    continue
                if target in files and target != name:
                    edges.add(target)
                if imported and imported.startswith("_") and not imported.startswith("__"):
                    private.append((name, node.lineno, f"{target}.{imported}"))
    return graph, private


def find_cycle(graph):
    """One import circle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


# A wing may import its own modules and the wings of lower levels; the package's top-level
# modules (``hrnet_d2``, ``hrnet_d2.convert``, ``hrnet_d2.analysis``) stand above every wing.
WING_LEVELS = {"utils": 0, "modeling": 1, "data": 1, "config": 2, "checkpoint": 3, "engine": 4}


def upward_imports(graph, package, levels):
    """[(importer, imported)] where a wing imports a wing of the same or a higher level."""

    def wing(module):
        parts = module.split(".")
        return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in levels) else None

    bad = []
    for src, targets in graph.items():
        a = wing(src)
        if a is None:
            continue
        for dst in targets:
            b = wing(dst)
            if b is None or (b != a and levels[b] >= levels[a]):
                bad.append((src, dst))
    return sorted(bad)


def test_package_imports_flow_one_way_and_stay_public():
    graph, private = import_graph(PACKAGE)
    assert "hrnet_d2.modeling.hrnet" in graph and "hrnet_d2.modeling.layers" in graph["hrnet_d2.modeling.hrnet"]
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
    assert not private, f"private names imported across modules: {private}"
    wings = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert wings == set(WING_LEVELS), f"wings without a level: {wings ^ set(WING_LEVELS)}"
    assert upward_imports(graph, "hrnet_d2", WING_LEVELS) == []


def test_checker_finds_upward_wing_imports(tmp_path):
    """Negative control: modeling importing engine, and data importing modeling (same level)."""
    pkg = tmp_path / "pkg"
    for wing in ("modeling", "data", "engine"):
        (pkg / wing).mkdir(parents=True)
        (pkg / wing / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from . import engine\n")
    (pkg / "engine" / "t.py").write_text("from ..modeling import m\n")
    (pkg / "modeling" / "m.py").write_text("def f():\n    from ..engine import t\n")
    (pkg / "data" / "d.py").write_text("from ..modeling.m import f\n")
    graph, _ = import_graph(pkg)
    levels = {"modeling": 1, "data": 1, "engine": 4}
    assert upward_imports(graph, "pkg", levels) == [
        ("pkg.data.d", "pkg.modeling.m"),
        ("pkg.modeling.m", "pkg.engine.t"),
    ]


def test_checker_finds_circles_and_private_imports(tmp_path):
    """Negative control: the same checks on a package that has both faults."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from .a import f  # inside a function still counts\n    return f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..b import _helper\nfrom pkg import sub\n")
    graph, private = import_graph(pkg)
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.b"}
    assert private == [("pkg.sub.c", 1, "pkg.b._helper")]
    assert graph["pkg.sub.c"] == {"pkg.b", "pkg.sub"}


@pytest.mark.parametrize("name", ["build_hrnet_backbone", "build_hrnetv2p_backbone", "build_hrnet_fpn_backbone"])
def test_builders_exported_and_registered(name):
    from detectron2.modeling.backbone import BACKBONE_REGISTRY

    assert BACKBONE_REGISTRY.get(name) is getattr(hrnet_d2, name)
