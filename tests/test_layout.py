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
