"""The import contract: layers only point down (calibrate < pruning < benchmarks < glu_prune_cli),
and inside benchmarks/ its rooms only point down too (measures, reference < deploy < grid < studies: the grid
runs deploy's speed and lm-eval figures, deploy never needs the grid); nothing outside
benchmarks/studies/ imports a study, and a study imports no other study (studies may import the
product). No project module imports itself back through others. Every import in a file counts,
function-local ones too, so no cycle can hide inside a function."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"calibrate": 0, "pruning": 1, "benchmarks": 2, "glu_prune_cli": 3}  # may import its own and lower
ROOMS = {"benchmarks.measures": 0, "benchmarks.reference": 0, "benchmarks.deploy": 1, "benchmarks.grid": 2,
         "benchmarks.studies": 3}
STUDIES = "benchmarks.studies"  # one study per module or package below it


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


def room(name: str, rooms: dict[str, int]) -> str | None:
    """The room (a key of ``rooms``) that holds module ``name``, None outside every room."""
    return next((r for r in rooms if name == r or name.startswith(r + ".")), None)


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int], rooms: dict | None = None) -> list[str]:
    """``a -> b`` for each import of a higher layer, or of a higher room in the same layer (a module of
    that layer outside every room ranks below its rooms)."""
    rooms = rooms or {}

    def rank(name: str) -> tuple[int, int]:
        return layers[name.split(".")[0]], rooms.get(room(name, rooms), -1)

    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if rank(b) > rank(a))


def study_of(name: str, studies: str) -> str | None:
    """The study holding module ``name`` (the first name below ``studies``), None outside them."""
    rest = name.removeprefix(studies + ".")
    return rest.split(".")[0] if rest != name else None


def study_imports(graph: dict[str, set[str]], studies: str) -> list[str]:
    """``a -> b`` for each import of a study from outside it: from the product or from another study."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if study_of(b, studies) is not None and study_of(a, studies) != study_of(b, studies))


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


def test_rooms_only_point_down_and_every_benchmark_is_in_one():
    graph = import_graph(REPO, LAYERS)
    benchmarks = [m for m in graph if m.startswith("benchmarks.")]
    assert {room(m, ROOMS) for m in benchmarks} == set(ROOMS)  # each room holds modules, none lies outside
    assert upward_imports(graph, LAYERS, ROOMS) == []


def test_nothing_in_the_product_imports_a_study_and_no_study_another():
    graph = import_graph(REPO, LAYERS)
    assert len({study_of(m, STUDIES) for m in graph} - {None}) >= 10
    assert study_imports(graph, STUDIES) == []


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


def test_the_checker_catches_a_room_pointing_up_and_a_study_imported(tmp_path):
    files = {
        "cli/__init__.py": "",
        "cli/main.py": "from top.lab.one import x\n",  # the product imports a study
        "top/__init__.py": "",
        "top/base/__init__.py": "",
        "top/base/m.py": "def f():\n    import top.runner.r\n",  # a lower room imports a higher one
        "top/runner/__init__.py": "",
        "top/runner/r.py": "from top.base import m\n",  # down: allowed
        "top/lab/__init__.py": "",
        "top/lab/one.py": "from top.runner import r\nfrom top.lab.pair import a\n",  # a study imports another
        "top/lab/pair/__init__.py": "",
        "top/lab/pair/a.py": "from top.lab.pair import b\n",  # within one study: allowed
        "top/lab/pair/b.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    layers, rooms = {"top": 0, "cli": 1}, {"top.base": 0, "top.runner": 1, "top.lab": 2}
    graph = import_graph(tmp_path, layers)
    assert upward_imports(graph, layers, rooms) == ["top.base.m -> top.runner.r"]
    assert study_imports(graph, "top.lab") == ["cli.main -> top.lab.one", "top.lab.one -> top.lab.pair.a"]


def test_the_registry_page_matches_the_registry(capsys):
    """docs/registry.md is what scripts/registry_table.py prints from pruning/registry.py."""
    import runpy

    runpy.run_path(str(REPO / "scripts" / "registry_table.py"), run_name="__main__")
    assert (REPO / "docs" / "registry.md").read_text() == capsys.readouterr().out



def test_the_architecture_page_names_every_module():
    """docs/architecture.md lists each module that is not a package (its path below its top package,
    in backticks) with its job."""
    page = (REPO / "docs" / "architecture.md").read_text()
    modules = [m for m in import_graph(REPO, LAYERS) if not (REPO / m.replace(".", "/")).is_dir()]
    assert len(modules) > 60
    assert [m for m in modules if f"`{m.split('.', 1)[1].replace('.', '/')}`" not in page] == []


PARAMETER_LIMIT = 8  # parameters of a function in the product's library and command line (self/cls not counted)
PARAMETER_PACKAGES = ("calibrate", "pruning", "glu_prune_cli")
LONG_SIGNATURES = {  # function -> why it keeps more than PARAMETER_LIMIT parameters
    "calibrate/tasks.py:evaluate_task": "a task's evaluation protocol: shots, size, seed, reference label, batch "
                                        "size, prefix cache and template are independent settings with defaults",
    "calibrate/prompts.py:task_documents": "pure text assembly from the task's parts (texts, labels, shot pool, "
                                           "label order) and the protocol's shots, seed, part and reference",
}


def long_signatures(root: Path, packages: tuple[str, ...], limit: int) -> dict[str, int]:
    """``path:function`` -> parameter count, for every function (methods too) over ``limit``."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    args = node.args
                    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                    count = len(names) - (names[:1] in (["self"], ["cls"])) + bool(args.vararg) + bool(args.kwarg)
                    if count > limit:
                        found[f"{path.relative_to(root)}:{node.name}"] = count
    return found


def test_no_function_takes_more_than_eight_parameters_but_the_named_ones():
    assert sorted(long_signatures(REPO, PARAMETER_PACKAGES, PARAMETER_LIMIT)) == sorted(LONG_SIGNATURES)


def test_the_parameter_check_sees_a_long_signature(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "m.py").write_text("def f(a, b, c, d, e, f, g, h, i):\n    pass\n"
                                           "class C:\n    def m(self, a, b, c, d, e, f, g, h):\n        pass\n"
                                           "def k(a, *rest, **options):\n    pass\n")
    assert long_signatures(tmp_path, ("lib",), PARAMETER_LIMIT) == {"lib/m.py:f": 9}
    assert long_signatures(tmp_path, ("lib",), 2) == {"lib/m.py:f": 9, "lib/m.py:m": 8, "lib/m.py:k": 3}


MODULE_LINES = 400  # lines of a module in the product and the benchmarks


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for package in ("calibrate", "pruning", "glu_prune_cli", "benchmarks")
            for p in sorted((REPO / package).rglob("*.py")) if (n := len(p.read_text().splitlines())) > MODULE_LINES}
    assert long == {}
