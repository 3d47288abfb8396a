"""Loading a config: YAML plus `key.sub=value` overrides (and Python sections), paths made
absolute, and the starter YAML of `posmine config init`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import textwrap
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from posmine.config.checks import ConfigError, from_dict, to_dict
from posmine.config.sections import MODEL_DEFAULT, Config, StageConfig
from posmine.io.redaction import has_credentials


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (),
                sections: Mapping[str, Any] | None = None) -> Config:
    """Load a `Config` from a YAML file (or defaults when `path` is None) plus overrides.

    Args:
        path: YAML file whose top-level keys are the stage names.
        overrides: `key.sub=value` strings; values are parsed as YAML scalars.
        sections: keys as nested mappings (`{"train": {"max_steps": 20}}`), merged over the
            file before the overrides.

    Every local path in the result is absolute (see `resolve_paths`).

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value; the message names it.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of stage names")
        raw = loaded or {}
    _merge(raw, sections or {})
    for item in overrides:
        apply_override(raw, item)
    return resolve_paths(from_dict(Config, raw, ""))


def _merge(raw: dict[str, Any], sections: Mapping[str, Any]) -> None:
    """`sections` deep-merged into `raw`: a nested mapping updates the section it names."""
    for key, value in sections.items():
        if isinstance(value, Mapping) and isinstance(raw.get(key), dict):
            _merge(raw[key], value)
        else:
            raw[key] = dict(value) if isinstance(value, Mapping) else value


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith(("beir:", "hf:"))


def absolute_path(path: str) -> str:
    """A local path made absolute against the current directory; URLs and `beir:` as given."""
    return path if _is_url(path) else os.path.abspath(os.path.expanduser(path))


def absolute_model(model: str | None) -> str | None:
    """A model given as a local path made absolute; `default` and Hugging Face ids as given.

    A name counts as local when it starts with `.`, `/` or `~`, or names an existing path
    (the same test `backbone.resolve_model` applies), so `org/name` stays a hub id.
    """
    if model is None or model == MODEL_DEFAULT or _is_url(model):
        return model
    if model.startswith((".", "/", "~")) or os.path.exists(model):
        return os.path.abspath(os.path.expanduser(model))
    return model


def resolve_paths(cfg: Config) -> Config:
    """Every local path in `cfg` made absolute, once, on the driver.

    Ray runs workers in their own working directories (Ray Train in the run's artifact
    folder, Tune in each trial's), so a relative path handed to one resolves somewhere else:
    a model written there is lost when Ray cleans its session folder.
    """
    def stage(st: StageConfig) -> StageConfig:
        mining, train = dict(st.mining), dict(st.train)
        if isinstance(mining.get("cross_encoder"), str):
            mining["cross_encoder"] = absolute_model(mining["cross_encoder"])
        if isinstance(train.get("model"), str):
            train["model"] = absolute_model(train["model"])
        return dataclasses.replace(st, mining=mining, train=train)

    for key, value in (("data.path", cfg.data.path), ("data.corpus", cfg.data.corpus or ""),
                       ("output.dir", cfg.output.dir),
                       ("teacher.model", cfg.teacher.model), ("train.model", cfg.train.model),
                       ("mining.cross_encoder", cfg.mining.cross_encoder or "")):
        if has_credentials(value):
            raise ConfigError(f"{key}: credentials in a URL are refused (they would reach "
                              "manifests and logs); set them in the environment instead")
    extra = tuple({**t, "model": absolute_model(t["model"])} if isinstance(t.get("model"), str)
                  else t for t in cfg.extra_teachers)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, path=absolute_path(cfg.data.path),
                                 corpus=absolute_path(cfg.data.corpus) if cfg.data.corpus else None),
        teacher=dataclasses.replace(cfg.teacher, model=str(absolute_model(cfg.teacher.model))),
        mining=dataclasses.replace(cfg.mining, cross_encoder=absolute_model(cfg.mining.cross_encoder)),
        train=dataclasses.replace(cfg.train, model=str(absolute_model(cfg.train.model))),
        output=dataclasses.replace(cfg.output, dir=absolute_path(cfg.output.dir)),
        stages=tuple(stage(st) for st in cfg.stages), extra_teachers=extra)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b=value` in the nested dict `raw` (value parsed as a YAML scalar)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not key.sub=value")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


_FIELD = re.compile(r"^\s{4}(\w+): (.+?)(?: = (.+?))?\s*(?:#\s*(.*))?$")


def field_help(cls: type) -> dict[str, str]:
    """Each field's meaning, from the source of config class `cls`: its inline comment, else
    the comment lines just above it (the configuration reference and `config init` read them)."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        m = _FIELD.match(line)
        if m and not stripped.startswith(("def ", "@")):
            inline = (m.group(4) or "").strip()
            out[m.group(1)] = " ".join([*above, inline] if inline else above)
        above = []
    return out


PRESETS = ("scifact", "cisi", "nv-retriever-v1")


def starter_yaml(preset: str | None = None) -> str:
    """A commented starter config: a shipped preset, or every key at its default with its
    meaning above it."""
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
        return (Path(__file__).parents[1] / "presets" / f"{preset}.yaml").read_text(encoding="utf-8")
    lines = ["# posmine config: every key at its default. Keep the ones you change;",
             "# `posmine config show FILE` prints it resolved, the reference lists every key."]
    defaults = to_dict(Config())
    defaults["data"]["path"] = "beir:scifact"  # the default's machine path, as its name
    top = field_help(Config)
    for section in dataclasses.fields(Config):
        value = defaults[section.name]
        if not isinstance(value, dict):  # stages, extra_teachers: lists
            lines += [f"# {t}" for t in textwrap.wrap(top.get(section.name, ""), 96)]
            lines.append(f"{section.name}: {_flow(value)}")
            continue
        lines.append(f"{section.name}:")
        hints = typing.get_type_hints(Config)[section.name]
        meaning = field_help(hints) if isinstance(hints, type) and dataclasses.is_dataclass(hints) else {}
        for key, v in value.items():
            lines += [f"  # {t}" for t in textwrap.wrap(meaning.get(key, ""), 94)]
            lines.append(f"  {key}: {_flow(v)}")
    return "\n".join(lines) + "\n"


def _flow(value: Any) -> str:
    """`value` as one line of YAML (flow style, keys in their order)."""
    dumped = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
    return dumped.replace("\n...\n", "").strip()
