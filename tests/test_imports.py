"""The repository's floor plan: no Python file of the packages, the benchmarks or the studies over 500 lines, at
most 150 tracked files; and the packages' import structure: every module imports first, in any order, and no
module imports its way back to itself (no cycle closed by a lazy import) or reaches for another module's private
names.

`import_graph(package)` reads the imports of every module of a package from its AST (top-level and inside
functions: a lazy import still forms an edge; imports guarded by `except ImportError` and under `TYPE_CHECKING`
do not: they are optional), `find_cycle` looks for a cycle in it, and `private_imports` lists the private names
one module takes from another. The same functions check any package of this repository.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["pacs_kernels", "pacs", "benchmarks"]


def package_modules(package: str) -> dict[str, Path]:
    """{dotted module name: file} of every module of `package` under the repository root (packages by __init__)."""
    base = ROOT / package
    modules = {}
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _optional(handlers: list[ast.ExceptHandler]) -> bool:
    """Whether a try's handlers catch a missing module (the import in its body is optional)."""
    names = set()
    for handler in handlers:
        for node in ast.walk(handler.type) if handler.type is not None else ():
            if isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def _imports(tree: ast.AST):
    """The Import / ImportFrom nodes of a module that are not optional (see the module docstring)."""
    found = []

    def visit(node, optional):
        if isinstance(node, ast.Try):
            guarded = optional or _optional(node.handlers)
            for child in node.body:
                visit(child, guarded)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, optional)
            return
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, optional)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not optional:
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child, optional)

    visit(tree, False)
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (`from ..x import y` inside `module`)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def module_imports(package: str) -> dict[str, list[tuple[str, list[str]]]]:
    """{module: [(imported module, [names taken from it]), ...]} within `package`, for the non-optional imports."""
    modules = package_modules(package)
    out = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = []
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        edges.append((alias.name, []))
                continue
            source = _resolve(name, path.name == "__init__.py", node)
            if source not in modules:
                continue
            names = []
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:  # `from . import submodule`
                    edges.append((f"{source}.{alias.name}", []))
                else:
                    names.append(alias.name)
            if names:
                edges.append((source, names))
        out[name] = edges
    return out


def import_graph(package: str) -> dict[str, set[str]]:
    """{module: the modules of `package` it imports}, without the parent packages Python imports on the way."""
    return {name: {target for target, _ in edges if target != name} for name, edges in module_imports(package).items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle [a, b, ..., a] of the directed graph, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def private_imports(package: str) -> list[str]:
    """'module: name from source' for every private name (leading underscore) a module imports from another module
    of the package, by `from x import _name` or as `x._name` on a module it imported."""
    modules = package_modules(package)
    found = []
    for name, edges in module_imports(package).items():
        for source, names in edges:
            found += [f"{name}: {n} from {source}" for n in names if n.startswith("_") and source != name]
        tree = ast.parse(modules[name].read_text(encoding="utf-8"))
        aliases = {}  # local name -> module of the package, from `from . import x` / `import pkg.x as y`
        for node in _imports(tree):
            for alias in node.names:
                if isinstance(node, ast.Import):
                    target = alias.name
                else:
                    target = f"{_resolve(name, modules[name].name == '__init__.py', node)}.{alias.name}"
                if target in modules and (alias.asname or isinstance(node, ast.ImportFrom)):
                    aliases[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{name}: {node.attr} of {aliases[node.value.id]}")
    return sorted(set(found))


def test_the_graph_sees_cycles_and_lazy_imports(tmp_path, monkeypatch):
    # A cycle closed by a function-level import is found; one guarded by `except ImportError` is optional.
    pkg = tmp_path / "demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n\ndef g():\n    from . import b\n    return b._hidden\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n    return g\n")
    (pkg / "c.py").write_text("try:\n    from .d import x\nexcept ImportError:\n    x = None\n")
    (pkg / "d.py").write_text("from .c import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = import_graph("demo")
    assert graph["demo.a"] == {"demo.b"} and graph["demo.b"] == {"demo.a"} and graph["demo.c"] == set()
    assert find_cycle(graph) == ["demo.a", "demo.b", "demo.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None
    assert private_imports("demo") == ["demo.a: _hidden of demo.b"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph = import_graph(package)
    assert len(graph) > 5 and any(graph.values())
    assert find_cycle(graph) is None


@pytest.mark.slow
@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_crosses_modules(package):
    assert private_imports(package) == []


# One fresh interpreter per package. A first forked child imports every module of the package and hands back the
# third-party modules that brought in, in import order; the parent imports those (torch, torch._dynamo, transformers:
# most of the start-up), then, for every module of the package, a forked child with none of the package's modules
# loaded imports that module first and then all the others, in sorted order or in reverse (alternately). A module
# whose import needs an optional third-party package that is absent (pacs.integrations.trl without trl) is skipped.
_CHILDREN = textwrap.dedent('''
    import gc, importlib, os, sys, traceback
    package, modules = sys.argv[1], sys.argv[2].split(",")
    ours = (package, "pacs", "pacs_kernels")

    def import_all(order):
        for name in order:
            try:
                importlib.import_module(name)
            except ImportError as err:
                if err.name and err.name.split(".")[0] not in ours:
                    print(f"skipped {name}: needs {err.name}", flush=True)
                    continue
                traceback.print_exc()
                return 1
            except Exception:
                traceback.print_exc()
                return 1
        return 0

    read, write = os.pipe()
    if os.fork() == 0:
        import_all(modules)
        third_party = [m for m in sys.modules if m.split(".")[0] not in ours]
        os.write(write, "\\n".join(third_party).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while True:
        chunk = os.read(read, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.wait()
    for name in b"".join(chunks).decode().splitlines():
        try:
            importlib.import_module(name)
        except Exception:
            pass
    gc.freeze()  # the children's collections skip the parent's objects (no copy-on-write of the whole heap)
    failures = 0
    for i, first in enumerate(modules):
        rest = [m for m in (modules if i % 2 == 0 else modules[::-1]) if m != first]
        pid = os.fork()
        if pid == 0:
            os._exit(import_all([first] + rest))
        _, status = os.waitpid(pid, 0)
        if status:
            print(f"FAILED: {first} first", flush=True)
            failures += 1
    print(f"{len(modules)} orders, {failures} failed", flush=True)
    sys.exit(1 if failures else 0)
''')


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per module")
@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports_first_in_any_order(package):
    modules = list(package_modules(package))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _CHILDREN, package, ",".join(modules)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert f"{len(modules)} orders, 0 failed" in proc.stdout


@pytest.mark.slow
def test_pacs_kernels_imports_without_triton():
    code = "import sys; sys.modules['triton'] = None; import pacs_kernels, pacs_kernels.dispatch; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-4000:]


# --------------------------------------------------------------------------------------------------------------
# Sizes: a file that outgrows 500 lines is split by what it does; the repository keeps to 150 files (summaries and
# plots of results, not per-run files: git history keeps the rest).

MAX_LINES = 500
MAX_FILES = 150


def tracked_files() -> list[str] | None:
    """The repository's tracked files, or None outside a git checkout (an unpacked source distribution)."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.splitlines() if out.returncode == 0 and out.stdout else None


def test_no_python_file_over_500_lines():
    long = {}
    for folder in ("pacs", "pacs_kernels", "benchmarks", "studies"):
        for path in (ROOT / folder).rglob("*.py"):
            n = len(path.read_text().splitlines())
            if n > MAX_LINES:
                long[str(path.relative_to(ROOT))] = n
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_at_most_150_tracked_files():
    files = tracked_files()
    if files is None:
        pytest.skip("not a git checkout")
    assert len(files) <= MAX_FILES, f"{len(files)} tracked files (at most {MAX_FILES})"
