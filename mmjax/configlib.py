"""Helpers for the experiment configs in configs/: loading a sibling config file, and the config argument.

    common = configlib.sibling(__file__, "common")           # configs/common.py, whatever the working directory
    args = configlib.parse_arg("base,sigmoid", choices=dict(variant=VARIANTS, loss=LOSSES), defaults=...)
    configlib.override(section, {"weight": 0.5, "image": {"flip": True}}, "data.sources.x")

The argument after the config path (`--config=configs/clip.py:ARG`) is comma-separated: `key=value` items, or
bare values that name their key by being one of its choices (`tiny`, `sigmoid`), else fill the next positional key.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from types import ModuleType
from typing import Any, Mapping, Sequence

import ml_collections


def sibling(file: str, name: str) -> ModuleType:
    """The config module `name`.py beside `file` (configs/ is a folder of files, not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"mmjax_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_arg(arg: str | None, *, defaults: Mapping[str, Any], choices: Mapping[str, Sequence[str]] | None = None,
              positional: Sequence[str] = ()) -> dict[str, Any]:
    """`defaults` updated from the config argument; unknown keys or values are errors naming the valid ones."""
    choices = dict(choices or {})
    out = dict(defaults)
    free = list(positional)
    for item in [p.strip() for p in (arg or "").split(",") if p.strip()]:
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key not in out:
                near = difflib.get_close_matches(key, list(out), n=3) or sorted(out)
                raise ValueError(f"unknown config argument {key!r}; valid: {near}")
        else:
            owners = [k for k, values in choices.items() if item in values]
            if owners:
                key, value = owners[0], item
            elif free:
                key, value = free[0], item
            else:
                valid = "; ".join(f"{k} is one of {', '.join(v)}" for k, v in choices.items())
                raise ValueError(f"unknown config argument {item!r} ({valid})")
        if key in choices and value not in choices[key]:
            raise ValueError(f"unknown {key} {value!r}; known: {sorted(choices[key])}")
        if key in free:
            free.remove(key)
        out[key] = value
    return out


def override(section: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str) -> ml_collections.ConfigDict:
    """`section` with `overrides` applied (dicts update nested sections); an unknown field is an error naming
    `where` and the nearest valid fields."""
    for key, value in overrides.items():
        if key not in section:
            near = difflib.get_close_matches(key, list(section), n=3) or sorted(section)
            raise ValueError(f"unknown field {key!r} of {where}; nearest valid: {near}")
        if isinstance(value, Mapping) and isinstance(section[key], ml_collections.ConfigDict):
            section[key].update(value)
        else:
            section[key] = value
    return section
