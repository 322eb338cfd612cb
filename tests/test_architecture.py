"""The layers of docs/ARCHITECTURE.md hold: every import in python/opdcore (lazy ones inside functions too)
goes to the same layer or one below, and the packages import each other without circles."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "python" / "opdcore"

# module prefix -> layer number of docs/ARCHITECTURE.md (longest prefix wins)
LAYERS = {
    "opdcore": 5, "opdcore._native": 5, "opdcore.ops": 5, "opdcore.packing": 5, "opdcore.reference": 5,
    "opdcore.metrics": 6, "opdcore.parallel": 6,
    "opdcore.objectives": 7,
    "opdcore.data": 8, "opdcore.rollout": 8, "opdcore.sft": 8,
    "opdcore.config": 9, "opdcore.presets": 9, "opdcore.recipes": 9,
    "opdcore.trainer": 10, "opdcore.diagnosis": 10, "opdcore.integrations": 10,
    "opdcore.cli": 11, "opdcore.commands": 11, "opdcore.__main__": 11,
}


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _unit(module: str) -> str:
    """The package (or top-level module) a module belongs to: opdcore.trainer.step -> opdcore.trainer."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(module: str, path: pathlib.Path):
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "opdcore" or name.startswith("opdcore."):
                yield name, node.lineno


def _known(name: str) -> str:
    """The longest prefix of an imported name that is a module or package here (drops imported attributes)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        rel = ROOT.parent.joinpath(*cand.split("."))
        if rel.with_suffix(".py").exists() or (rel / "__init__.py").exists():
            return cand
    return name


def test_no_upward_imports():
    bad = []
    for module, path in _modules():
        for name, line in _imports(module, path):
            target = _known(name)
            if _layer(target) > _layer(module):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({module}, layer {_layer(module)}) imports "
                           f"{target} (layer {_layer(target)})")
    assert not bad, "upward imports:\n" + "\n".join(sorted(set(bad)))


def test_packages_import_without_circles():
    graph = {}
    for module, path in _modules():
        for name, _ in _imports(module, path):
            a, b = _unit(module), _unit(_known(name))
            if a != b and b != "opdcore":
                graph.setdefault(a, set()).add(b)
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_every_module_has_a_layer():
    for module, _ in _modules():
        assert _layer(module) > 0, module
