"""The gateway's layout keeps itself: imports run one way down the layers, never in a circle.

``proxy/`` is read top to bottom: the process (``main``, ``app``, ``gateway``, ``settings``...)
uses the relay, which uses tenancy policy, which uses observability, the key store and, at the
bottom, what the APIs say. A module may import from its own layer or a lower one; an import
that climbs back up, or any circle of imports (at any depth, inside functions and
``TYPE_CHECKING`` blocks too), fails here.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"
LAYERS = ("", "batch", "relay", "tenancy", "observe", "keys", "protocol")
"""Top to bottom; ``""`` is the top level of ``proxy/`` (the process and its wiring)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The ``proxy`` modules that module ``name`` imports, wherever in it the import stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "proxy")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "proxy":
                continue
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if child in known else source)
    return {m for m in found if m in known and m != name}


def layer(name: str) -> int:
    parts = name.split(".")
    sub = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""
    return LAYERS.index(sub)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def test_every_sub_package_is_a_known_layer():
    subs = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert subs <= set(LAYERS), f"add {subs - set(LAYERS)} to LAYERS, in its place"


@pytest.mark.parametrize("name", sorted(graph()))
def test_imports_never_climb(name):
    climbing = sorted(m for m in graph()[name] if layer(m) < layer(name))
    assert not climbing, f"{name} (layer {LAYERS[layer(name)] or 'top'}) imports {climbing}"


def test_no_import_circle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                circle = [*trail[trail.index(nxt):], nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])


def test_the_checker_sees_a_climb_and_a_circle(tmp_path, monkeypatch):
    """The guard itself: a planted climb and a planted circle are both found."""
    root = tmp_path / "proxy"
    for folder in (root, root / "protocol", root / "relay"):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    (root / "settings.py").write_text("from . import workers\n")
    (root / "workers.py").write_text("if False:\n    from .settings import X\n")
    (root / "protocol" / "errors.py").write_text("from ..relay import forward\n")
    (root / "relay" / "forward.py").write_text("from ..protocol.errors import E\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "PACKAGE", root)
    edges = graph()
    assert "proxy.relay.forward" in edges["proxy.protocol.errors"]
    assert layer("proxy.relay.forward") < layer("proxy.protocol.errors")
    assert "proxy.settings" in edges["proxy.workers"] and "proxy.workers" in edges["proxy.settings"]
