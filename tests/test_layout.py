import sysconfig
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_platform_is_the_standard_library_module() -> None:
    import platform

    import posmine.config  # noqa: F401  (importing the package must not shadow it)

    assert Path(platform.__file__).parent == Path(sysconfig.get_paths()["stdlib"])
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_pure_core_does_not_import_ray() -> None:
    """Importing the pure core (rules, merge, losses, metrics) loads no Ray module, directly or
    through anything it imports (checked in a fresh interpreter, not by reading the source)."""
    import subprocess
    import sys

    code = ("import sys; import posmine.mining, posmine.losses, posmine.metrics, posmine.merge; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "platform"), "PATH": ""})
    assert out.stdout.strip() == "[]", out.stdout[:500]


def _imports() -> dict[str, set[str]]:
    """posmine module -> the posmine modules it imports, at the top or inside a function. The
    package's `__init__` is the node `posmine`: importing a name it defines (`from posmine import
    __version__`, `import posmine`) imports it."""
    import ast

    modules = {"posmine" if p.stem == "__init__" else p.stem: p
               for p in (ROOT / "platform" / "posmine").glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "posmine":
                graph[name] |= {a.name if a.name in modules else "posmine" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("posmine."):
                graph[name].add(node.module.split(".")[1])  # type: ignore[union-attr]
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name.split(".")[1] if "." in a.name else "posmine"
                                for a in node.names if a.name.split(".")[0] == "posmine"}
        graph[name].discard(name)  # `from posmine import api` inside the package: not a cycle
    return graph


def test_no_module_imports_one_that_imports_it_back() -> None:
    """The package's imports form no cycle, however long (a depth-first search for a back edge),
    lazy imports inside functions included."""
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return [*path[path.index(n):], n] if n in path else [m, n]
            if n not in state and (found := cycle_from(n, [*path, n])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            assert (found := cycle_from(m, [m])) is None, " -> ".join(found)
