"""The package layers inside megatron/: no package imports another both ways, and no longer cycle either.

Every import counts, function-local ones included (a lazy import still ties two packages together); only
imports under `if TYPE_CHECKING:` are left out. Top-level modules (errors, fileio, cli, deepspeed_compat) are
packages of their own here."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(tree: ast.AST):
    """Module names imported anywhere in `tree`, except inside `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (m for child in node.orelse for m in _imports(ast.Module(body=[child], type_ignores=[])))
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "megatron":  # from megatron import fileio, ...
            yield from (f"megatron.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        yield from _imports(node)


def package_graph(root: Path = ROOT / "megatron") -> dict:
    """{package: {package it imports: [files that do]}} for the packages and top-level modules of megatron/."""
    graph: dict = {}
    for path in root.rglob("*.py"):
        package = path.relative_to(root).parts[0].removesuffix(".py")
        for module in _imports(ast.parse(path.read_text())):
            parts = module.split(".")
            if parts[0] == "megatron" and len(parts) > 1 and parts[1] != package:
                graph.setdefault(package, {}).setdefault(parts[1], []).append(str(path.relative_to(root.parent)))
    return graph


def find_cycle(graph: dict):
    """One cycle of packages as a list (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_package_import_cycle_inside_megatron():
    graph = package_graph()
    cycle = find_cycle(graph)
    where = [f"{a} -> {b}: {sorted(set(graph[a][b]))}" for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, "package import cycle " + " -> ".join(cycle) + "\n" + "\n".join(where)


def test_the_cycle_finder_sees_function_local_imports(tmp_path):
    pkg = tmp_path / "megatron"
    (pkg / "a").mkdir(parents=True)
    (pkg / "b").mkdir()
    (pkg / "a" / "x.py").write_text("from megatron.b.y import f\nfrom megatron import d\n")
    (pkg / "b" / "y.py").write_text("def f():\n    from megatron.a import x\n"
                                    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import megatron.c\n")
    graph = package_graph(pkg)
    assert set(graph["b"]) == {"a"}  # the TYPE_CHECKING import is left out
    assert set(graph["a"]) == {"b", "d"}  # `from megatron import d` names a package too
    assert find_cycle(graph) == ["a", "b", "a"]


def test_the_checkpoint_package_is_below_training_and_convert():
    graph = package_graph()
    assert "training" not in graph.get("checkpoint", {}) and "convert" not in graph.get("checkpoint", {})
    assert "checkpoint" not in graph.get("config", {}) and "checkpoint" not in graph.get("optimizer", {})


def test_post_training_is_above_training_and_nothing_in_megatron_imports_it():
    """megatron/post_training/ (SFT, DPO) plugs into the loop as a task: training knows only its interface
    (training/task.py), and the entry point finetune_gpt.py hands the task in."""
    graph = package_graph()
    importers = [package for package, imports in graph.items() if "post_training" in imports]
    assert importers == [], importers
    assert "training" in graph.get("post_training", {})


def test_the_inference_package_sits_above_checkpoint_and_model():
    graph = package_graph()
    below = ("config", "distributed", "core", "model", "data", "checkpoint", "convert", "optimizer", "training")
    assert not [p for p in below if "inference" in graph.get(p, {})], "a lower package imports megatron.inference"
    assert "training" not in graph.get("inference", {}) and "convert" not in graph.get("inference", {})
