"""The package's shape (docs/architecture.md): its imports form no cycle, no bpt_ds module imports
another inside a function (the glue that used to hold cycles together), components never import
the runner or a stage, and every stage is registered. Read from the source with ast, no import."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bpt_ds"
COMPONENTS = {"distributed", "files", "report", "errors", "likelihood", "checkpoints", "deepspeed_setup", "step",
              "evaluation", "train_log", "config", "prompts", "model", "svgd", "backbone", "plan", "tiny"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """(imported bpt_ds module, at module level) for every import outside `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}
    top = {id(n) for n in tree.body}
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = (package[:len(package) - node.level + 1] if node.level else []) + (
                node.module.split(".") if node.module else [])
            targets = [".".join(base + [a.name]) if ".".join(base + [a.name]) in modules else ".".join(base)
                       for a in node.names]
        out += [(t, id(node) in top) for t in targets if t in modules and t != module_name(path)]
    return out


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges, lazy = {}, []
    for name, path in files.items():
        found = imports(path, set(files))
        edges[name] = {t for t, _ in found}
        lazy += [(name, t) for t, at_top in found if not at_top]
    return edges, lazy


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    state, stack, found = {}, [], []

    def visit(u: str) -> None:
        state[u] = "open"
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(edges):
        if u not in state:
            visit(u)
    return found


def test_the_checker_sees_a_cycle_and_a_function_level_import(tmp_path):
    """The checks below can fail: a two-module cycle, one side imported inside a function."""
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    pkg = tmp_path / "bpt_ds"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from .a import f\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        edges, lazy = graph()
    finally:
        PACKAGE = saved
    assert edges == {"bpt_ds.a": {"bpt_ds.b"}, "bpt_ds.b": {"bpt_ds.a"}} and lazy == [("bpt_ds.a", "bpt_ds.b")]


def test_no_import_cycle_and_no_function_level_import_of_bpt_ds():
    edges, lazy = graph()
    assert "bpt_ds.runner" in edges and "bpt_ds.stages.base" in edges  # the walk saw the package
    assert cycles(edges) == []
    assert lazy == []


def test_components_never_import_the_runner_or_a_stage():
    edges, _ = graph()
    for name in COMPONENTS:
        above = {t for t in edges[f"bpt_ds.{name}"] if t in ("bpt_ds.runner", "bpt_ds.runs", "bpt_ds.pipeline")
                 or t.startswith("bpt_ds.stages")}
        assert not above, (name, above)


def test_every_stage_file_is_registered_under_its_name():
    from bpt_ds.stages import STAGES
    from bpt_ds.stages.base import Stage

    files = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__", "base"}
    modules = {cls.__module__.rsplit(".", 1)[1] for cls in STAGES.values()}
    assert modules == files
    assert all(issubclass(cls, Stage) and cls.name == name for name, cls in STAGES.items())
