"""The shape of the code, drawn from its imports: no circles, the product never imports the lab, small files, and a
wheel that ships the product only.

Imports are read from the AST, at module level *and* inside functions (an import put in a function to dodge a
circle is still an arrow). ``from package import name`` counts as an arrow to ``package.name`` when that is a
module, else to ``package``.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"kvemb_st": ROOT / "kvemb_st", "kvemb_lab": ROOT / "lab" / "kvemb_lab"}
MAX_PRODUCT_LINES = 350


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of both packages (a package is its ``__init__``)."""
    modules = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_modules(path: Path, module: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` (at ``path``) imports anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    return {nearest_module(target, known) for target in targets} - {None, module}


def nearest_module(name: str, known: set[str]) -> str | None:
    """``name`` itself if it is one of ours, else its closest enclosing module of ours (``a.b.c`` -> ``a.b``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {module: imported_modules(path, module, known) for module, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or ``None`` (depth-first search, colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_import_graph_is_drawn_from_both_packages():
    """A guard for the drawing itself: known arrows are found, function-level ones included."""
    graph = import_graph()
    assert "kvemb_st.config" in graph["kvemb_st.module"]
    assert "kvemb_lab.doc_tasks" in graph["kvemb_lab.evaluation"]
    assert "kvemb_st.kernel_check" in graph["kvemb_lab.backend_check"]  # `from kvemb_st import kernel_check`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_product_never_imports_the_lab():
    arrows = [(a, b) for a, targets in import_graph().items() if a.startswith("kvemb_st") for b in targets
              if b.startswith("kvemb_lab")]  # fmt: skip
    assert not arrows, f"kvemb_st imports the lab: {arrows}"
    for path in PACKAGES["kvemb_st"].rglob("*.py"):  # also a lazy import_module("kvemb_lab...") or a string import
        assert "kvemb_lab" not in path.read_text(encoding="utf-8"), f"{path.relative_to(ROOT)} names kvemb_lab"


def test_no_product_file_is_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGES["kvemb_st"].rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_PRODUCT_LINES}  # fmt: skip
    assert not long, f"files in kvemb_st/ over {MAX_PRODUCT_LINES} lines: {long}"


def test_the_wheels_ship_the_product_and_the_lab_apart():
    """From the setuptools configuration (no build, no pip): the product's wheel lists every package folder of
    kvemb_st and nothing else; the lab's lists kvemb_lab's and depends on the product."""
    product = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    lab = tomllib.loads((ROOT / "lab" / "pyproject.toml").read_text(encoding="utf-8"))
    for config, name in ((product, "kvemb_st"), (lab, "kvemb_lab")):
        shipped = set(config["tool"]["setuptools"]["packages"])
        assert all(p == name or p.startswith(name + ".") for p in shipped), (name, shipped)
        folders = {
            ".".join((name, *init.parent.relative_to(PACKAGES[name]).parts))
            for init in PACKAGES[name].rglob("__init__.py")
        }
        assert folders <= shipped, f"{name}: package folders missing from the wheel: {folders - shipped}"
    assert product["project"]["name"] == "kvemb-st" and lab["project"]["name"] == "kvemb-lab"
    assert any(dep.startswith("kvemb-st") for dep in lab["project"]["dependencies"])
    assert not any("kvemb-lab" in dep for deps in product["project"].get("optional-dependencies", {}).values()
                   for dep in deps)  # fmt: skip
