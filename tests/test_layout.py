"""The floor plan holds: no import cycles among mpitrain's modules (function-level imports
count too), comm/ imports nothing above it, one training step and one checkpoint writer.
Reads the source only (valid at any world size)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mpitrain"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the mpitrain modules it imports anywhere in its body."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[m] |= {n for n in names if n in mods and n != m}
    return graph


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    assert "mpitrain.bench.model" in graph and graph["mpitrain.bench.model"]  # the walk sees the imports
    assert _cycles(graph) == []


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_relative_import_resolves():
    """A relative import inside a function runs late: one that names no module of the
    package (e.g. left behind by a move) fails only when that code runs."""
    mods, bad = _modules(), []
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
                if base not in mods:
                    bad.append(f"{m}:{node.lineno} from {'.' * node.level}{node.module or ''}")
    assert bad == []


def test_comm_is_the_floor():
    """comm/ (MPI, buffers, RMA) imports nothing of mpitrain but itself and errors.py."""
    above = {m: sorted(t for t in ts if not t.startswith("mpitrain.comm") and t != "mpitrain.errors")
             for m, ts in _graph().items() if m.startswith("mpitrain.comm")}
    assert {m: ts for m, ts in above.items() if ts} == {}


def test_one_step_and_one_checkpoint_writer():
    """Only step.py calls a strategy's after_backward and the precision step; only
    state.py writes checkpoints."""
    calls = {}
    for m, p in _modules().items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                calls.setdefault(node.func.attr, set()).add(m)
    assert calls["after_backward"] == {"mpitrain.step"}
    assert {m for m in calls["write"] if "checkpoint.write" in _modules()[m].read_text()} == {"mpitrain.state"}
