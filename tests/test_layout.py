"""The architecture, held by parsing every import of the package (function-level ones too):

    posmine/core     the method, pure: rules, merge, losses, metrics
    posmine/io       fsspec storage, input and export formats, Arrow files
    posmine/models   backbones, encoders, model folders, cross-encoders
    posmine/stages   one module (or package) per stage, and the stage pattern they share
    posmine/         config, pipeline, cli, report, terminal and the public API
"""

import ast
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "platform" / "posmine"

# What a module of each layer may import of posmine (a prefix of the imported module's name).
ALLOWED = {
    "posmine.core": ("posmine.config", "posmine.core"),
    "posmine.io": ("posmine.config", "posmine.core", "posmine.io"),
    "posmine.models": ("posmine.config", "posmine.core", "posmine.io", "posmine.models"),
}
# Stages meet through files and the stage helper: what any stage may import.
STAGE_SHARED = ("posmine.config", "posmine.core", "posmine.io", "posmine.models",
                "posmine.stages.lifecycle", "posmine.stages.remote", "posmine.stages.faults",
                "posmine.terminal", "posmine.report")
# Tune runs the mine stage, the training loop and dev scoring inside each trial.
TUNE_RUNS = ("posmine.stages.mine", "posmine.stages.train", "posmine.stages.evaluate")


def _modules() -> dict[str, Path]:
    """Dotted name -> file, a package's `__init__` named as the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports() -> dict[str, set[str]]:
    """Module -> the posmine modules it imports, at the top or inside a function. `from a import
    b` is an edge to `a.b` when that is a module, else to `a` (a name its `__init__` defines);
    `from posmine import b` is an edge to the package `posmine` too, whose `__init__` imports
    the API lazily."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "posmine":
                mod = node.module or ""
                graph[name] |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod
                                for a in node.names}
                if mod == "posmine":
                    graph[name].add("posmine")
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name.split(".")[0] == "posmine"}
        graph[name].discard(name)
    return graph


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _stage_of(module: str) -> str:
    return ".".join(module.split(".")[:3])  # posmine.stages.<stage>


def test_platform_is_the_standard_library_module() -> None:
    import platform

    import posmine.config  # noqa: F401  (importing the package must not shadow it)

    assert Path(platform.__file__).parent == Path(sysconfig.get_paths()["stdlib"])
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_the_folders_show_the_architecture() -> None:
    modules = _modules()
    for layer in ("posmine.core", "posmine.io", "posmine.models", "posmine.stages"):
        assert layer in modules, f"{layer} is not a package"
    for stage in ("data", "embed", "search", "mine", "train", "evaluate", "audit", "tune"):
        assert f"posmine.stages.{stage}" in modules, f"no stage module posmine.stages.{stage}"
    top = sorted(m for m in modules if m.count(".") == 1)
    assert top == ["posmine.api", "posmine.cli", "posmine.config", "posmine.core", "posmine.io",
                   "posmine.models", "posmine.pipeline", "posmine.report", "posmine.stages",
                   "posmine.terminal"], top


def test_pure_core_does_not_import_ray() -> None:
    """Importing the pure core loads no Ray module, directly or through anything it imports
    (checked in a fresh interpreter, not by reading the source)."""
    core = sorted(m for m in _modules() if m.startswith("posmine.core."))
    code = (f"import sys; import {', '.join(core)}; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "platform"), "PATH": ""})
    assert out.stdout.strip() == "[]", out.stdout[:500]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = sorted(f"{m} -> {n}" for m, deps in _imports().items() if _under(m, (layer,))
                   for n in deps - {"posmine"} if not _under(n, ALLOWED[layer]))
    assert not wrong, "\n".join(wrong)


def test_stages_meet_only_through_files_and_the_stage_helper() -> None:
    wrong = []
    for m, deps in _imports().items():
        if not m.startswith("posmine.stages.") or _under(m, STAGE_SHARED):
            continue
        allowed = (*STAGE_SHARED, _stage_of(m),
                   *(TUNE_RUNS if _stage_of(m) == "posmine.stages.tune" else ()))
        wrong += [f"{m} -> {n}" for n in sorted(deps - {"posmine"}) if not _under(n, allowed)]
    assert not wrong, "\n".join(wrong)


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


def test_modules_and_functions_stay_small() -> None:
    """Under 600 lines a module, and 60 a function's body (its signature and docstring apart)."""
    long = []
    for name, path in _modules().items():
        text = path.read_text()
        if (n := len(text.splitlines())) >= 600:
            long.append(f"{name}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body[1:] if ast.get_docstring(node) is not None else node.body
                size = node.end_lineno - body[0].lineno + 1 if body else 0  # type: ignore[operator]
                if size > 60:
                    long.append(f"{name}.{node.name}: {size} lines")
    assert not long, "\n".join(long)
