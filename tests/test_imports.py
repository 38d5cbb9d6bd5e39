"""The package's import graph: no module imports one that imports it back, lazily or not, by an
import statement or by name through importlib."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def loaded_by_name() -> dict[str, set[str]]:
    """The imports an import statement does not show: lorad.cli loads lorad.commands.<name>
    through importlib.import_module for each name in its COMMAND_MODULES."""
    from lorad import cli

    return {"lorad.cli": {f"lorad.commands.{name}" for name in cli.COMMAND_MODULES}}


def _imports_by_name(tree: ast.AST) -> list[ast.Call]:
    """Calls of importlib.import_module or __import__ (how a module is imported by name)."""
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (
            isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            or isinstance(node.func, ast.Name)
            and node.func.id in ("import_module", "__import__")
        )
    ]


def import_graph(by_name: bool = True) -> dict[str, set[str]]:
    """lorad module -> the lorad modules it imports anywhere in its body (function-level too),
    and with ``by_name`` those it imports through importlib as well.

    Raises:
        AssertionError: a module imports a module by a name the graph cannot tell (not a string
            literal, and not in :func:`loaded_by_name`).
    """
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    dynamic = loaded_by_name() if by_name else {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        for call in _imports_by_name(tree) if by_name else ():
            target = call.args[0] if call.args else None
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                graph[name].add(target.value)  # trimmed to a lorad module below
            else:
                assert name in dynamic, (
                    f"{path}:{call.lineno} imports a module by a computed name: "
                    "teach loaded_by_name() which modules it loads"
                )
        graph[name] |= dynamic.get(name, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                graph[name].add(t)
        graph[name] = {_known(t, modules) for t in graph[name]} - {None, name, "lorad"}
    return graph


def _known(target: str, modules) -> str | None:
    """The lorad module an import of ``target`` runs (a name inside a module: that module)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target if target.startswith("lorad") else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_graph_holds_the_command_modules_cli_loads_through_importlib():
    from lorad import cli

    graph = import_graph()
    assert "lorad.buffer.store" in graph["lorad.buffer.examples"]  # the graph is really read
    assert len(cli.COMMAND_MODULES) >= 10
    assert {f"lorad.commands.{name}" for name in cli.COMMAND_MODULES} <= graph["lorad.cli"]
    assert "lorad.commands.client" not in import_graph(by_name=False)["lorad.cli"]  # only importlib shows it


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert "lorad.buffer.store" in graph["lorad.buffer.examples"]  # the graph is really read
    assert cycles(graph) == []
