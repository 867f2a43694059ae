"""Bounded YAML loading: manifests become JSON-like data, or one refusal with a location.

Where it sits: ``manifest.parse_documents`` (and so ``rlhfspec validate`` and ``rlhfspec run``)
loads text with :func:`load_all`; the operator never sees YAML (the API server hands it JSON).
PyYAML's ``safe_load`` has no limits: a list nested 20,000 deep overflows the recursion
limit, and a "billion laughs" document (aliases of aliases) expands to billions of elements.
The composer below refuses such input while it reads the events, before anything is built:

* a document may span at most :data:`MAX_DOCUMENT_CHARS` characters;
* collections may nest at most :data:`MAX_DEPTH` levels;
* a document may count at most :data:`MAX_NODES` nodes, each alias counted as a full copy of
  what it names (this is what stops alias bombs, as kubectl's "excessive aliasing" does);
  an alias inside the node it names (a cycle) is refused;
* an integer literal may have at most :data:`MAX_INT_CHARS` characters (Python refuses to
  convert more than 4300 digits, and no field takes more than 64 bits);
* a mapping may not repeat a key (YAML would silently keep the last value).

The constructor then builds what Kubernetes would read: mapping keys are the key's text
(Kubernetes turns YAML into JSON, whose keys are strings), timestamps stay strings, and
tags with no JSON equivalent (binary, set, omap, pairs) are refused.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from rlhfspec_api.echo import key_text

MAX_FILE_BYTES = 16 * 1024 * 1024
"""Largest file read at all (it may hold many documents)."""
MAX_DOCUMENT_CHARS = 1536 * 1024
"""Largest single document: etcd stores no object larger than 1.5 MiB."""
MAX_DEPTH = 64
"""Deepest nesting of lists and mappings (an RLHFJob needs about 8)."""
MAX_NODES = 100_000
"""Most nodes of one document, aliases expanded (an RLHFJob has about 200)."""
MAX_INT_CHARS = 64
"""Longest integer literal."""

_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NOT_JSON = ("binary", "set", "omap", "pairs")


class InputRefused(yaml.YAMLError):
    """Input past one of the limits; names where (``path``, ``mark``) and what is allowed."""

    def __init__(self, path: str, problem: str, allowed: str, mark: yaml.Mark | None) -> None:
        super().__init__(f"{path}: {problem} ({allowed})")
        self.path, self.problem, self.allowed, self.mark = path, problem, allowed, mark


_MAX_PATH_CHARS = 160


def _join(parts: list[str | int]) -> str:
    """``spec.dataset.path``; long keys and long paths are cut (a key may be megabytes)."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        part = key_text(part)
        out += f".{part}" if out else part
    if len(out) > _MAX_PATH_CHARS:
        half = _MAX_PATH_CHARS // 2
        out = out[:half] + "…" + out[-half:]
    return out or "(document)"


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer enforces the limits of this module (see its docstring)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._path: list[str | int] = []
        # Expanded size of every finished node of the current document, by id: an alias
        # adds the size of the node it names without walking it again.
        self._sizes: dict[int, int] = {}
        self._aliases = 0
        self._document_start = 0

    def _refuse(self, problem: str, allowed: str, mark: Any) -> InputRefused:
        return InputRefused(_join(self._path), problem, allowed, mark)

    # PyYAML's type stubs leave the event API unannotated; these give it types once.
    def _peek(self) -> Any:
        return self.peek_event()  # type: ignore[no-untyped-call]

    def _next(self) -> Any:
        return self.get_event()  # type: ignore[no-untyped-call]

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # The scanner reads ahead of the composer (up to 1024 characters for a possible
        # mapping key), so ``[[[[...`` is cheapest to refuse here, where brackets are counted.
        if self.flow_level >= MAX_DEPTH:
            raise self._refuse(
                "nested too deeply",
                f"at most {MAX_DEPTH} levels of lists and mappings",
                self.get_mark(),  # type: ignore[no-untyped-call]
            )
        super().fetch_flow_collection_start(TokenClass)  # type: ignore[no-untyped-call]

    def compose_document(self) -> Node | None:
        self._sizes, self._aliases = {}, 0
        self._document_start = self._peek().start_mark.index
        node: Node | None = super().compose_document()
        self._sizes = {}  # the node ids are only meaningful while the document is built
        return node

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self._peek()
        self._check_extent(event.start_mark)
        if isinstance(event, AliasEvent):
            alias = super().compose_node(parent, index)
            if id(alias) not in self._sizes:
                raise self._refuse(
                    f"alias *{event.anchor} refers to a node that contains it",
                    "aliases of finished nodes only (no cycles)",
                    event.start_mark,
                )
            self._aliases += 1
            return alias
        if isinstance(index, ScalarNode):
            self._path.append(index.value)
        elif isinstance(index, int):
            self._path.append(index)
        else:
            self._path.append("")  # a mapping key: reported under its mapping's path
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise self._refuse(
                "nested too deeply",
                f"at most {MAX_DEPTH} levels of lists and mappings",
                event.start_mark,
            )
        node = super().compose_node(parent, index)
        assert node is not None  # only an empty stream composes to None, never a node
        self._check_node(node)
        self._depth -= 1
        self._path.pop()
        return node

    def _check_extent(self, mark: yaml.Mark) -> None:
        if mark.index - self._document_start > MAX_DOCUMENT_CHARS:
            raise self._refuse(
                "document is too large",
                f"at most {MAX_DOCUMENT_CHARS} characters per document",
                mark,
            )

    def _check_node(self, node: Node) -> None:
        # Checked at both ends of a node: one long scalar is only seen at its end.
        self._check_extent(node.end_mark)
        size = 1
        if isinstance(node, SequenceNode):
            size += sum(self._sizes[id(child)] for child in node.value)
        elif isinstance(node, MappingNode):
            size += sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        elif node.tag == _INT_TAG and len(node.value) > MAX_INT_CHARS:
            raise self._refuse(
                f"integer literal of {len(node.value)} characters",
                f"an integer of at most {MAX_INT_CHARS} characters",
                node.start_mark,
            )
        if size > MAX_NODES:
            problem = (
                "excessive aliasing: aliases expand the document"
                if self._aliases
                else "the document has too many elements"
            )
            raise self._refuse(
                f"{problem} past {MAX_NODES} nodes",
                f"at most {MAX_NODES} nodes, aliases counted as copies",
                node.start_mark,
            )
        self._sizes[id(node)] = size

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        # PyYAML's own loop, plus a refusal of repeated keys (merge keys ``<<`` excepted:
        # explicit keys override merged ones by design).
        start = self._next()
        tag = start.tag
        if tag is None or tag == "!":
            tag = self.resolve(MappingNode, None, start.implicit)  # type: ignore[no-untyped-call]
        node = MappingNode(tag, [], start.start_mark, None, flow_style=start.flow_style)
        if anchor is not None:
            self.anchors[anchor] = node
        seen: set[str] = set()
        while not self.check_event(yaml.MappingEndEvent):
            key = self.compose_node(node, None)
            assert key is not None
            if isinstance(key, ScalarNode) and key.tag != _MERGE_TAG:
                if key.value in seen:
                    self._path.append(key.value)
                    raise self._refuse(
                        "key appears twice in this mapping", "each key once", key.start_mark
                    )
                seen.add(key.value)
            value = self.compose_node(node, key)
            node.value.append((key, value))
        node.end_mark = self._next().end_mark
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise ConstructorError(
                    None,
                    None,
                    "a mapping key must be a plain value (a string)",
                    key_node.start_mark,
                )
            # The key's text, as Kubernetes reads it (JSON keys are strings): `1: x` is "1".
            mapping[key_node.value] = self.construct_object(value_node, deep=deep)
        return mapping


def _refuse_tag(loader: BoundedLoader, node: Node) -> Any:
    raise ConstructorError(
        None,
        None,
        f"tag {node.tag} has no JSON equivalent (a manifest is JSON data)",
        node.start_mark,
    )


# Timestamps stay the text written, as Kubernetes reads them.
BoundedLoader.add_constructor(
    "tag:yaml.org,2002:timestamp",
    BoundedLoader.construct_yaml_str,  # type: ignore[type-var]
)
for _name in _NOT_JSON:
    BoundedLoader.add_constructor(f"tag:yaml.org,2002:{_name}", _refuse_tag)


def load_all(text: str) -> list[object]:
    """Every document of ``text``; raises yaml.YAMLError (InputRefused past a limit)."""
    loader = BoundedLoader(text)
    try:
        documents: list[object] = []
        while loader.check_data():  # type: ignore[no-untyped-call]
            documents.append(loader.get_data())
        return documents
    finally:
        loader.dispose()
