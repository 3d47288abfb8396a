import sysconfig
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_platform_is_the_standard_library_module() -> None:
    import platform

    import posmine.config  # noqa: F401  (importing the package must not shadow it)

    assert Path(platform.__file__).parent == Path(sysconfig.get_paths()["stdlib"])
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_pure_core_does_not_import_ray() -> None:
    for name in ("mining.py", "metrics.py", "losses.py"):
        path = ROOT / "platform" / "posmine" / name
        if path.exists():
            assert "import ray" not in path.read_text(), name
