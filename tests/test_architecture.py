"""The import contract: layers only point down (calibrate < pruning < benchmarks < glu_prune_cli),
and no project module imports itself back through others. Every import in a file counts,
function-local ones too, so no cycle can hide inside a function."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"calibrate": 0, "pruning": 1, "benchmarks": 2, "glu_prune_cli": 3}  # may import its own and lower


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(root: Path, name: str) -> bool:
    path = root / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def project_imports(path: Path, root: Path, packages: set[str]) -> set[str]:
    """The project modules a file imports: ``from a import b`` is an edge to ``a.b`` when that is a
    module, else to ``a``."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if is_module(root, f"{node.module}.{alias.name}") else node.module
                     for alias in node.names]
        else:
            continue
        modules.update(name for name in names if name.split(".")[0] in packages and is_module(root, name))
    return modules


def import_graph(root: Path, layers: dict[str, int]) -> dict[str, set[str]]:
    graph = {}
    for package in layers:
        for path in sorted((root / package).rglob("*.py")):
            graph[module_name(path, root)] = project_imports(path, root, set(layers))
    return graph


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if layers[b.split(".")[0]] > layers[a.split(".")[0]])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges = {a: targets - {a} for a, targets in graph.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_layers_only_point_down():
    graph = import_graph(REPO, LAYERS)
    assert len(graph) > 40
    assert upward_imports(graph, LAYERS) == []


def test_no_import_cycles():
    assert cycles(import_graph(REPO, LAYERS)) == []


def test_nothing_imports_the_command_line():
    graph = import_graph(REPO, LAYERS)
    assert not [a for a, targets in graph.items() if not a.startswith("glu_prune_cli")
                and any(b.startswith("glu_prune_cli") for b in targets)]


def test_the_checker_catches_an_upward_import_and_a_cycle(tmp_path):
    files = {
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from high.c import g\n",  # upward, hidden in a function
        "low/b.py": "from low import a\n",
        "high/__init__.py": "",
        "high/c.py": "import high.d\n",
        "high/d.py": "from high.c import g\n",  # c -> d -> c
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    layers = {"low": 0, "high": 1}
    graph = import_graph(tmp_path, layers)
    assert upward_imports(graph, layers) == ["low.a -> high.c"]
    assert cycles(graph) == [["high.c", "high.d"]]


def test_the_registry_page_matches_the_registry(capsys):
    """docs/registry.md is what scripts/registry_table.py prints from pruning/registry.py."""
    import runpy

    runpy.run_path(str(REPO / "scripts" / "registry_table.py"), run_name="__main__")
    assert (REPO / "docs" / "registry.md").read_text() == capsys.readouterr().out
