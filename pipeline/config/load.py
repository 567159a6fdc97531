"""Loading the config tree (pipeline/config/tree.py): defaults <- YAML <- CLI, and writing it back.

    cfg = load_config("configs/demo.yaml", ["--train.steps=50", "--optim.lr=1e-3"])
    validate(cfg, world_size=2)                     # pipeline/config/rules.py

YAML files may start with `base: <file>.yaml` (model.config.read_config_tree). CLI overrides are
`--section.key=value` or `--section.key value`; values are parsed as YAML scalars/lists (`1e-3`,
`true`, `null`, `[0.9,0.95]`) and then checked against the field's type. Unknown sections or keys
raise ValueError listing the valid ones. MLflow params come from `to_flat_dict(cfg)`, the saved
YAML from `to_yaml(cfg)`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from model.config import build_section, read_config_tree
from pipeline.config.tree import SECTIONS, Config


def parse_overrides(argv: list[str]) -> dict[str, dict[str, Any]]:
    """`--section.key=value` / `--section.key value` arguments as {section: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        name, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"override --{name} has no value")
            raw, i = argv[i + 1], i + 1
        section, _, key = name.partition(".")
        if section not in SECTIONS:
            raise ValueError(f"unknown section {section!r} in --{name}; valid sections: {sorted(SECTIONS)}")
        out.setdefault(section, {})[key] = _parse_raw(raw, SECTIONS[section], key)
        i += 1
    return out


def _parse_raw(raw: str, cls: type, key: str) -> Any:
    """A CLI string as YAML, except for string fields, whose text is kept as typed."""
    hint = typing.get_type_hints(cls).get(key)
    optional_str = typing.get_origin(hint) in (Union, types.UnionType) and set(typing.get_args(hint)) == {str, type(None)}
    if hint is str or optional_str:
        return None if optional_str and raw.lower() in ("null", "none", "~") else raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


# ---------------------------------------------------------------- load and save


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (with `base:`) <- `--section.key=value` overrides; paths resolved."""
    tree = read_config_tree(path) if path else {}
    where = str(path) if path else "defaults"
    unknown = sorted(set(tree) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; valid sections: {sorted(SECTIONS)}")
    cli = parse_overrides(overrides or [])
    sections = {}
    for name, cls in SECTIONS.items():
        values = {**(tree.get(name) or {}), **cli.get(name, {})}
        sections[name] = build_section(cls, values, name)
    return resolve_defaults(Config(**sections))


def resolve_defaults(cfg: Config) -> Config:
    """Fill the derived defaults so the saved config says what the run actually used."""
    run_dir = Path(cfg.train.run_dir)
    if cfg.checkpoint.dir is None:
        cfg.checkpoint.dir = str(run_dir / "checkpoints")
    if cfg.tracking.run_name is None:
        cfg.tracking.run_name = run_dir.name
    if cfg.tracking.tracking_uri is None:
        # An explicit config value wins over the environment, which wins over the default.
        cfg.tracking.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    """{"section.key": value}: the MLflow params."""
    return {f"{s}.{k}": v for s, section in to_dict(cfg).items() for k, v in section.items()}


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def describe_keys(cfg: Config | None = None) -> str:
    """Every `--section.key` with its value and help line: the body of `--help`. The value is
    cfg's (a loaded --config) where given, with the built-in default beside it where they differ."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        section = None if cfg is None else getattr(cfg, name)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            value = default if section is None else getattr(section, f.name)
            differs = "" if value == default else f" (default {default!r})"
            lines.append(f"  --{name}.{f.name}={value!r}{differs}  {f.metadata.get('help', '')}".rstrip())
    return "\n".join(lines)
