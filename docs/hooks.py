"""mkdocs hook: the CLI and configuration references, generated from the code at build time
so they cannot drift from it (`<!-- posmine:cli -->`, `<!-- posmine:config -->`)."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import os

from posmine import config as cfgmod

os.environ.setdefault("COLUMNS", "100")  # argparse wraps its help to the terminal

def _type(tp: Any) -> str:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return f"`{name}`" if name else str(tp)


def _range(tp: Any) -> str:
    for meta in getattr(tp, "__metadata__", ()):
        if isinstance(meta, cfgmod.Range):
            return f"[{meta.lo:g}, {meta.hi:g}]"
    return ""


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        factory = f.default_factory  # type: ignore[misc]
        if inspect.isfunction(factory):  # computed where it runs: name it, not this machine's value
            return f"`{factory.__name__}()`"
        value = factory()
    else:
        return ""
    if dataclasses.is_dataclass(value):
        return "(section)"
    text = repr(value) if not isinstance(value, tuple) or len(repr(value)) < 40 else "(see below)"
    return f"`{text}`".replace("|", "\\|")


def config_reference() -> str:
    lines = []
    sections = [(f.name, typing.get_type_hints(cfgmod.Config, include_extras=True)[f.name])
                for f in dataclasses.fields(cfgmod.Config)]
    for section, tp in sections:
        cls = typing.get_args(tp)[0] if typing.get_origin(tp) is not None else tp
        if not dataclasses.is_dataclass(cls):
            lines += [f"## `{section}`", "", f"`{section}`: {_type(tp)}; see the config classes.", ""]
            continue
        doc = inspect.getdoc(cls) or ""
        lines += [f"## `{section}`", "", doc.split("\n\n")[0].replace("\n", " "), "",
                  "| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        hints = typing.get_type_hints(cls, include_extras=True)
        meaning = cfgmod.field_help(cls)
        for f in dataclasses.fields(cls):
            text = meaning.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{section}.{f.name}` | {_type(hints[f.name])} | {_default(f)} | "
                         f"{_range(hints[f.name])} | {text} |")
        lines.append("")
    return "\n".join(lines)


def cli_reference() -> str:
    from posmine.cli import _parser

    parser = _parser()
    parts = ["## `posmine`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for action in parser._subparsers._group_actions:  # the verbs, in the parser's order
        for name, sub in action.choices.items():
            parts += [f"## `posmine {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
            for inner in getattr(sub, "_subparsers", None)._group_actions if sub._subparsers else []:
                for iname, isub in inner.choices.items():
                    parts += [f"### `posmine {name} {iname}`", "", "```text",
                              isub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


ROOT = Path(__file__).resolve().parents[1]


def on_page_markdown(markdown: str, **_: Any) -> str:
    if "<!-- posmine:benchmarks -->" in markdown:  # BENCHMARKS.md, its links made site-relative
        text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8").replace("](docs/", "](")
        markdown = markdown.replace("<!-- posmine:benchmarks -->", text)
    if "<!-- posmine:config -->" in markdown:
        markdown = markdown.replace("<!-- posmine:config -->", config_reference())
    if "<!-- posmine:cli -->" in markdown:
        markdown = markdown.replace("<!-- posmine:cli -->", cli_reference())
    return markdown
