"""Sanity checks of a tool's `parameters` JSON Schema before it reaches the decoder.

A malformed schema (wrong `type`, a `pattern` that is not a regular expression, non-object nodes,
absurd nesting) is a 400 at the edge rather than a crash in template rendering or grammar code
downstream (RELIABILITY.md §1.3 row 31). This is not a full JSON Schema validator: it checks the
keywords that downstream code interprets.
"""

from __future__ import annotations

import re
from typing import Any

_MAX_DEPTH = 32

_SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def _check_node(node: Any, depth: int) -> None:
    """Reject schemas that downstream grammar or template code could choke on."""
    if depth > _MAX_DEPTH:
        raise ValueError("parameters schema is nested too deeply")
    if not isinstance(node, dict):
        raise ValueError("every schema node must be a JSON object")
    kind = node.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if not all(isinstance(k, str) and k in _SCHEMA_TYPES for k in kinds):
        raise ValueError(f"schema `type` must be one of {sorted(_SCHEMA_TYPES)}")
    if "pattern" in node:
        if not isinstance(node["pattern"], str):
            raise ValueError("schema `pattern` must be a string")
        try:
            re.compile(node["pattern"])
        except re.error as exc:
            raise ValueError("schema `pattern` is not a valid regular expression") from exc
    props = node.get("properties", {})
    if not isinstance(props, dict):
        raise ValueError("schema `properties` must be an object")
    if "required" in node and not (
        isinstance(node["required"], list) and all(isinstance(r, str) for r in node["required"])
    ):
        raise ValueError("schema `required` must be a list of strings")
    children = list(props.values())
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            children.append(node[key])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node:
            if not isinstance(node[key], list):
                raise ValueError(f"schema `{key}` must be a list")
            children.extend(node[key])
    for child in children:
        _check_node(child, depth + 1)


def check_tool_schema(schema: dict[str, Any]) -> None:
    """Raise ValueError (with a message safe to show the client) when ``schema`` is unusable."""
    _check_node(schema, depth=0)
