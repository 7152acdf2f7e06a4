"""Typed recipe loading: YAML (data only) -> nested ``@dataclass(kw_only=True)`` objects, validated by pydantic.

Every key is checked: unknown keys, wrong types and failed ``__post_init__`` checks raise ``ConfigError``
naming the dotted key (``pretrain.zero_stage``) and the file. Nothing is silently rewritten; the only coercion
is int -> float, which YAML users expect (``lr: 1`` is a float field).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a string; recipes use YAML 1.2 floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."))


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A recipe problem; the message names the file and the dotted key."""


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def from_dict(cls: type, data: dict) -> Any:
    """Build dataclass ``cls`` (and the dataclasses nested in it) from plain YAML data with pydantic.

    Validated as JSON in strict mode: JSON is what YAML data is, and strict JSON takes a mapping for a
    dataclass while refusing ``"10"`` or ``true`` for an integer (int -> float is the one coercion). The
    dataclasses' own ``__post_init__`` checks run as part of it.
    """
    text = json.dumps(data, default=str)  # a YAML date becomes a string, refused where the field is not one
    try:
        return _adapter(cls).validate_json(text, strict=True, extra="forbid")
    except ValidationError as exc:
        raise ConfigError("; ".join(_message(cls, err) for err in exc.errors())) from None


def _dotted(loc: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _type_at(cls: type, loc: tuple) -> Any:
    """The declared type at ``loc`` inside ``cls`` (for the valid keys of an unknown one)."""
    tp = cls
    for part in loc:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
        elif args:  # list[X] / X | None
            tp = args[-1]
    return tp


# pydantic speaks JSON; recipes are YAML.
_YAML_WORDS = {"Input should be": "expected", "a valid array": "a list", "an object": "a mapping",
               "a valid dictionary": "a mapping"}


def _message(cls: type, err: dict) -> str:
    """One pydantic error as ``dotted.key: reason``, the shape of the dataclasses' own ValueErrors."""
    loc = _dotted(err["loc"])
    if err["type"] == "value_error":  # a __post_init__ check: "field: reason", relative to its section
        text = str(err["ctx"]["error"])
        return f"{loc}.{text}" if loc else text
    if err["type"] == "unexpected_keyword_argument":
        owner = _type_at(cls, err["loc"][:-1])
        valid = sorted(f.name for f in dataclasses.fields(owner) if f.init) if dataclasses.is_dataclass(owner) else []
        return f"{loc}: unknown key" + (f" (valid keys: {', '.join(valid)})" if valid else "")
    msg = err["msg"]
    for json_word, yaml_word in _YAML_WORDS.items():
        msg = msg.replace(json_word, yaml_word)
    given = repr(err["input"])
    return f"{loc or '(top level)'}: {msg}, got {given if len(given) <= 80 else given[:77] + '...'}"


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (["a","b","c"], yaml-parsed VALUE)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. pretrain.zero_stage=3")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment")
    return parts, load_yaml(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a plain dict; unknown keys are caught later by ``from_dict``."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
    return data


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same directory + rename, so readers never see a partial file. On object
    storage one PUT is already atomic (the old object or the whole new one)."""
    from cluster.storage import ObjectPath, location

    path = location(path)
    if isinstance(path, ObjectPath):
        path.write_text(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
