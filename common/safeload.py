"""Reading documents from people and peers without letting their shape hurt us.

YAML and JSON can describe structures far larger than their text: deep nesting makes
parsers and validators recurse until Python gives up, and YAML aliases can point back
at the node that holds them (a structure that contains itself) or fan out (a few lines
that expand to a billion elements when walked). Both arrive as a config file or a
request body; both must be refused with a clear message, never followed. Limits here
are far above what any real config or request of this project holds.
"""

from __future__ import annotations

from typing import Any

import yaml

# nesting of mappings and lists: a job file is about five levels deep
MAX_DEPTH = 64
# nodes an alias may stand for, all aliases of a document together
MAX_ALIASED_NODES = 10_000


class DocumentTooComplex(ValueError):
    """The document is nested too deep, refers to itself, or expands too far."""


def _size(node: yaml.Node, seen: dict[int, int]) -> int:
    """Nodes under ``node``, itself included (each shared node counted where it stands)."""
    if id(node) in seen:
        return seen[id(node)]
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_size(child, seen) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_size(k, seen) + _size(v, seen) for k, v in node.value)
    seen[id(node)] = total
    return total


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses deep nesting, self-reference and alias fan-out."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open: set[str] = set()  # anchors of the nodes being composed
        self._aliased = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise DocumentTooComplex(
                    f"alias *{event.anchor} refers to the node that holds it "
                    f"({event.start_mark}); a document cannot contain itself"
                )
            node = super().compose_node(parent, index)
            self._aliased += 0 if node is None else _size(node, self._sizes)
            if self._aliased > MAX_ALIASED_NODES:
                raise DocumentTooComplex(
                    f"aliases stand for more than {MAX_ALIASED_NODES} nodes in all "
                    f"({event.start_mark}); write the values out"
                )
            return node
        anchor = getattr(event, "anchor", None)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise DocumentTooComplex(
                f"nested more than {MAX_DEPTH} levels deep ({event.start_mark})"
            )
        if anchor is not None:
            self._open.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open.discard(anchor)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` within the limits; ``DocumentTooComplex`` or ``yaml.YAMLError``."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse a parsed JSON value nested deeper than ``limit`` (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                raise DocumentTooComplex(f"nested more than {limit} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
