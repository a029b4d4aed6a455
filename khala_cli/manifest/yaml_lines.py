"""YAML with line numbers: every mapping and list remembers where it and its items start.

A safe loader (no object tags) that also refuses duplicate keys, so the manifest checks can
name the line of every value they reject.
"""

from __future__ import annotations

from typing import Any

import yaml


class MarkedDict(dict):
    """A mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]


class MarkedList(list):
    """A sequence that remembers its own line and the line of each item (1-based)."""

    line: int = 0
    item_lines: list[int]


class DuplicateKey(yaml.MarkedYAMLError):
    """A mapping gives the same key twice."""


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> MarkedDict:
    loader.flatten_mapping(node)
    out = MarkedDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if key in out:
            raise DuplicateKey(
                None, None,
                f"duplicate key {key!r} (first on line {out.key_lines[key]})",
                key_node.start_mark,
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> MarkedList:
    out = MarkedList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def parse(text: str) -> Any:
    """The document, with marked mappings and lists. Raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def syntax_error(exc: yaml.YAMLError) -> tuple[int, str]:
    """(line, message) for a YAML error, as the manifest reports it."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return 1, f"YAML error: {exc}"
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or str(exc)
    if exc.context and not isinstance(exc, DuplicateKey):
        problem = f"{exc.context}, {problem}"
    return (mark.line + 1 if mark else 1), f"YAML syntax error: {problem}"


def line_of(d: Any, key: Any, default: int) -> int:
    """The line of `key` in a marked mapping (else the mapping's own line, else default)."""
    if isinstance(d, MarkedDict):
        return getattr(d, "key_lines", {}).get(key, d.line or default)
    return default


def item_lines(v: Any, line: int) -> list[int]:
    """The line of each item of a marked list (else `line` for each)."""
    return getattr(v, "item_lines", None) or [line] * len(v)
