"""The package's layers, read from its source: every import between the package's parts (imports inside functions
included) goes from a higher layer to a lower one, so the import graph has no cycle and nothing reaches up
(issue 28). The one exception is the Hugging Face registration in ``megatron_elastic/__init__.py``."""

import ast
import pathlib

import megatron_elastic

PACKAGE = pathlib.Path(megatron_elastic.__file__).parent

# lowest first; parts on one line are one layer and import none of each other
LAYERS = [
    ["errors"],
    ["ops", "compat"],
    ["parallel"],
    ["data"],
    ["model"],
    ["store"],
    ["training"],
    ["elastic"],
    ["importance", "extraction"],
    ["serving"],
    ["evaluation", "harness", "testing"],
    ["plan"],
    ["demo"],
    ["cli"],
    ["__main__"],
]
LEVEL = {part: i for i, layer in enumerate(LAYERS) for part in layer}
ALLOWED_UPWARD = {("__init__", "extraction")}  # transformers' Auto classes learn elastic_nemotron_h on import


def _part(module: str) -> str:
    """``megatron_elastic.model.builder`` -> ``model``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_part(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name).is_dir()


def _imports(path: pathlib.Path):
    """(importing module, imported module) for every import of the package in ``path``."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module or node.level else []
            if target == "megatron_elastic":  # `from megatron_elastic import compat`
                names = [f"megatron_elastic.{a.name}" if _is_part(a.name) else target for a in node.names]
            yield from ((module, n) for n in names if n.startswith("megatron_elastic"))
        elif isinstance(node, ast.Import):
            yield from ((module, a.name) for a in node.names if a.name.startswith("megatron_elastic"))


def _edges():
    for path in sorted(PACKAGE.rglob("*.py")):
        for src, dst in _imports(path):
            a, b = _part(src), _part(dst)
            if a != b:
                yield a, b, path.relative_to(PACKAGE)


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    parts -= {"__init__", "__pycache__", "recipes"}
    assert parts - LEVEL.keys() == set(), "a new part of the package: give it a layer in LAYERS"


def test_imports_only_go_down_the_layers():
    upward = sorted(
        f"{where}: {a} imports {b}"
        for a, b, where in _edges()
        if (a, b) not in ALLOWED_UPWARD and a != "__init__" and b != "__init__" and LEVEL[a] <= LEVEL[b]
    )
    assert upward == []


def test_the_import_graph_of_the_parts_has_no_cycle():
    graph = {}
    for a, b, _ in _edges():
        if (a, b) not in ALLOWED_UPWARD:
            graph.setdefault(a, set()).add(b)
    state = {}

    def visit(node, trail):
        if state.get(node) == "open":
            raise AssertionError("import cycle: " + " -> ".join(trail + [node]))
        if state.get(node) == "done":
            return
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])
