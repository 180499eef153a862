"""Typed run configs: pydantic models loaded from YAML, with errors that name the field."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 as ``safe_load`` reads it, less base-60 numbers: ``ratio: 7:3`` stays the string
    ``"7:3"`` instead of becoming the integer 423 (YAML 1.2 dropped them too)."""


_INT = re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$""")
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"""
                    r"""|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""")
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse config YAML (a file or a ``--set`` value): ``yaml.safe_load`` without base-60 numbers."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


def parse_ratio(value: Any) -> Any:
    """``"7:3"`` (T2I:edit, as the paper writes it) -> ``{t2i: 7, edit: 3}``; mappings pass through."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        # Unquoted in YAML, 7:3 is the base-60 integer 423: refuse it rather than guess.
        raise ValueError(f"got the number {value!r}: YAML reads an unquoted 7:3 as a base-60 number; "
                         "quote it ('7:3') or write {t2i: 7, edit: 3}")
    if isinstance(value, str):
        parts = value.split(":")
        try:
            t2i, edit = (float(part) for part in parts)
        except ValueError:
            raise ValueError(f"{value!r} is not a T2I:edit ratio: write '7:3' or {{t2i: 7, edit: 3}}") from None
        return {"t2i": t2i, "edit": edit}
    return value


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A config file that does not validate; the message lists each field path and its fix."""


_FIXES = {
    "extra_forbidden": "unknown key: remove it or check its spelling",
    "missing": "required: add this key",
}


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: {error.error_count()} invalid field(s)"]
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"])
        message = _FIXES.get(item["type"], item["msg"])
        if item["type"] == "value_error":  # our own validators' messages name their fields
            message = message.removeprefix("Value error, ")
        got = item.get("input")
        got_text = ""
        if item["type"] != "missing" and not isinstance(got, dict):
            got_text = f" (got {got!r})"
        lines.append(f"  - {path}: {message}{got_text}" if path else f"  - {message}{got_text}")
    return "\n".join(lines)


def parse_config(model: type[T], data: dict[str, Any], source: str = "<config>") -> T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(model: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Load ``path`` (YAML) into ``model``; ``overrides`` are dotted keys set on top."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return parse_config(model, data, str(path))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key.sub=value`` strings from the CLI (``--set``); values parsed as config YAML (numbers,
    lists, null, ``7:3`` as text)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=100")
        try:
            out[key.strip()] = load_yaml(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
    return out


def merge_into(section: dict[str, Any], values: dict[str, Any]) -> None:
    """Merge a mapping into a config section key by key (sub-sections merged in turn)."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(section.get(key), dict):
            merge_into(section[key], value)
        else:
            section[key] = copy.deepcopy(value)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a config tree; a number indexes a list (``models.2.path``).

    A mapping set onto an existing section is merged into it, so ``train={max_steps: 2}`` (or a
    demo's ``distill.set.train.max_steps=2``, which arrives as that mapping) changes one key and
    keeps the section's others; any other value replaces what was there."""
    keys = dotted.split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
                where = ".".join(keys[:depth]) or "the config"
                raise ConfigError(f"--set {dotted}: {where} is a list of {len(node)}; "
                                  f"use an index 0..{len(node) - 1} in place of {key!r}")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[:depth])} is a value ({node!r}), "
                              f"not a section with a {key!r} key")
        elif last:
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge_into(node[key], value)
            else:
                node[key] = value
        else:
            node = node.setdefault(key, {})


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (lists stay whole), as ``--set`` names them."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """``{dotted key: [old, new]}`` for every leaf that differs (None where a side lacks it)."""
    before, after = flatten(old), flatten(new)
    return {k: [before.get(k), after.get(k)] for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k)}


def config_hash(config: BaseModel | dict) -> str:
    """Stable hash of a config's content (key order does not matter)."""
    payload = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
