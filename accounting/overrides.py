"""``key.path=value`` overrides of nested parameter models (the simulator's ``--set``, the method's
``--method-set`` and the API's ``set=``).

Where it sits: a helper of the parameter models, with no knowledge of what they mean. Values are read
as TOML (numbers, booleans, strings, arrays, inline tables), else taken as a plain string.
"""

from __future__ import annotations

import tomllib
from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value``; the value is read as TOML (numbers, booleans, strings, arrays), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not key.path=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted`` = ``a.b.c``, creating tables on the way."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"{dotted}: {key} is not a table")
        node = child
    node[keys[-1]] = value


def apply_overrides(model: M, overrides: list[str]) -> M:
    """A copy of ``model`` with ``overrides`` applied and validated (pydantic's ValidationError, a
    ValueError, names the field that is wrong; so does ValueError for a malformed override)."""
    if not overrides:
        return model
    data = model.model_dump(mode="json")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return type(model).model_validate(data)
