"""The package's shape (docs: README "What is in it"): the library never imports the command
line, no library module imports another inside a function (the commands do, so that `--help`
imports no heavy library), and the imports between the package's own modules, those inside
functions included, form no cycle. Read from the source with `ast`, without importing anything."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "dbl_scale"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _own_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported dbl_scale module, inside a function?) for every import of the package's own
    modules in one file; `from .x import name` counts as an import of `.x.name` when that is
    a module, else of `.x`."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
        for t in targets:
            if t == "dbl_scale" or t.startswith("dbl_scale."):
                out.append((t, id(node) in in_function))
    return out


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): {t for t, _ in _own_imports(p) if t != _module_name(p)}
            for p in PACKAGE.rglob("*.py")}


def test_the_library_never_imports_the_command_line():
    for module, imports in _graph().items():
        if not module.startswith("dbl_scale.cli"):
            assert not [t for t in imports if t.startswith("dbl_scale.cli")], module


def test_the_library_never_imports_the_tools():
    """`data_tools/` (converters, ShapesCaptions) stands on the library: no module of dbl_scale
    outside cli/ imports it."""
    for path in PACKAGE.rglob("*.py"):
        if _module_name(path).startswith("dbl_scale.cli"):
            continue
        tree = ast.parse(path.read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
        assert not [m for m in imported if m == "data_tools" or m.startswith("data_tools.")], path


def test_no_own_module_is_imported_inside_a_function():
    for path in PACKAGE.rglob("*.py"):
        if _module_name(path).startswith("dbl_scale.cli"):
            continue  # a command imports the library when it runs: `dbl-scale --help` stays under a second
        inside = [t for t, in_function in _own_imports(path) if in_function]
        assert not inside, (path, inside)


def test_no_import_cycles():
    graph = _graph()
    done, path = set(), []

    def visit(node):
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert len(graph) > 30 and "dbl_scale.train" in graph["dbl_scale.cli.train"]  # the graph is really read


def test_no_method_switch_outside_the_methods_package():
    outside = [f"{path}:{n}" for path in PACKAGE.rglob("*.py") if "methods" not in path.relative_to(PACKAGE).parts
               for n, line in enumerate(path.read_text().splitlines(), 1) if "method ==" in line]
    assert not outside, outside


def test_the_registry_knows_every_configurable_method():
    import typing

    from dbl_scale.config import LossConfig
    from dbl_scale.methods import METHODS

    allowed = typing.get_args(typing.get_type_hints(LossConfig)["method"])
    assert sorted(METHODS) == sorted(allowed)


def test_readme_opens_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", text, re.S)
    assert [line.split("#")[0].strip() for line in blocks[0].strip().splitlines()] == ["make demo", "make test"]


def test_readme_lists_every_config_choice_as_config_py_has_it():
    """The README's list of keys with a fixed set of choices is config.py's Literal types, key
    for key and choice for choice, in order."""
    import dataclasses
    import typing

    from dbl_scale.config import Config

    def choices(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            options = [tp] + list(typing.get_args(tp)) if typing.get_origin(tp) is typing.Union else [tp]
            for t in options:
                if typing.get_origin(t) is typing.Literal:
                    yield prefix + f.name, list(typing.get_args(t))
                elif dataclasses.is_dataclass(t):
                    yield from choices(t, prefix + f.name + ".")

    text = (REPO / "README.md").read_text()
    listed = {m.group(1): re.findall(r"`([^`]+)`", m.group(2))
              for m in re.finditer(r"^- `([a-z_.]+)`: (.*)$", text.split("The keys with a fixed set of choices:")[1],
                                   re.M)}
    assert listed == dict(choices(Config))


def test_every_module_says_its_job_first():
    """Each module of the package opens with a docstring whose first line names its job."""
    for path in PACKAGE.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, path


def test_no_native_code_in_the_package():
    """No C source, no ctypes or cffi, no compiler flags: where fusion pays, torch.compile writes
    the kernel, and eager torch is the fallback."""
    files = [p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert not [p for p in files if p.suffix in (".c", ".cc", ".cpp", ".h", ".so")]
    for path in (p for p in files if p.suffix == ".py"):
        text = path.read_text()
        assert not re.search(r"\bimport (ctypes|cffi)\b|\bfrom (ctypes|cffi)\b|-march=native", text), path


def _rooms() -> dict[str, set[str]]:
    """The import graph with each sub-package one node (cli, methods, evaluation), as a reader
    sees the layout: top-level modules and folders."""
    def room(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2])

    out: dict[str, set[str]] = {}
    for module, imports in _graph().items():
        out.setdefault(room(module), set()).update(room(t) for t in imports if room(t) != room(module))
    return out


def test_layers_stay_shallow():
    """No room of the package imports one that imports it back (directly or not), and the
    longest chain of rooms importing each other is at most 10."""
    rooms = _rooms()
    depth: dict[str, int] = {}

    def floor(node: str, seen: tuple = ()) -> int:
        assert node not in seen, "rooms import each other: " + " -> ".join(seen + (node,))
        if node not in depth:
            depth[node] = 1 + max((floor(n, seen + (node,)) for n in rooms.get(node, ()) if n in rooms), default=0)
        return depth[node]

    longest = max(floor(n) for n in rooms)
    assert 5 < longest <= 10, {n: d for n, d in sorted(depth.items(), key=lambda x: -x[1])}
    assert depth["dbl_scale.cli"] == longest and depth["dbl_scale.errors"] == 1  # commands on top, errors a leaf


def test_module_docstrings_are_short_and_carry_no_timings():
    """A module docstring states a contract in a few lines; timings and machines go to
    BENCHMARKS.md, where they are kept current."""
    timing = re.compile(r"\b\d+(\.\d+)?\s?(ms|µs|s|seconds|minutes|GFLOP/s|MiB/s|GB/s)\b|2-core|Xeon|EPYC")
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree, clean=False) or ""
        assert len(doc.strip().splitlines()) <= 12, (path, len(doc.splitlines()))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node, clean=False) or ""
                assert not timing.search(text), (path, getattr(node, "name", "module"), timing.search(text).group())
