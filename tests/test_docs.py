"""The documentation's promises that code can check: the generated references cover every config
key and verb, and the README stays a product page."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

from posmine import config
from posmine.cli import VERBS

ROOT = Path(__file__).resolve().parents[1]


def _hooks():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("posmine_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_reference_names_every_key_with_a_meaning() -> None:
    page = _hooks().config_reference()
    for section in dataclasses.fields(config.Config):
        cls = section.type if isinstance(section.type, type) else None
        default = section.default_factory() if section.default_factory is not dataclasses.MISSING else None
        if not dataclasses.is_dataclass(default) and cls is None:
            continue
        for f in dataclasses.fields(default or cls):  # type: ignore[arg-type]
            row = next((r for r in page.splitlines() if r.startswith(f"| `{section.name}.{f.name}` |")), None)
            assert row is not None, f"{section.name}.{f.name} missing from the reference"
            assert not row.rstrip().endswith("|  |"), f"{section.name}.{f.name} has no meaning"


def test_the_cli_reference_covers_every_verb() -> None:
    page = _hooks().cli_reference()
    for verb in VERBS:
        assert f"## `posmine {verb}`" in page, verb


def test_the_readme_is_a_product_page() -> None:
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 200
    assert lines[3].startswith("# 1.") and "pytest" in lines[7]  # the two commands first
    assert not re.search(r"#\d{2}\b|/tmp/|\bcommit [0-9a-f]{7}|\bsession\b", text)
    assert text.index("## From Python") < text.index("## From the command line")
