"""Reading YAML text that a user wrote: one document, no duplicate keys, aliases within bounds,
and the line of every key, for errors that name it.

PyYAML's safe loader shares the node an alias points to, so nine levels of nine aliases
("billion laughs") parse in microseconds into a structure that expands to 9⁹ values the moment
anything walks it. So the composed node graph is measured first — every node counted once per
path that reaches it, each node's count computed once (a linear pass) — and refused above
:data:`MAX_NODES` or when an alias refers to a node that contains it (a cycle), before any
Python object is built from it. Only then are the values constructed and the key lines read.
"""

from __future__ import annotations

import yaml

from eprun.errors import RecipeError

#: the most YAML nodes a document may expand to, its aliases followed (a bundled recipe has ~60)
MAX_NODES = 10_000


def _where(name: str, node: yaml.Node) -> str:
    return f"{name}:{node.start_mark.line + 1}"


def _expanded_size(root: yaml.Node, name: str) -> int:
    """Nodes reached from ``root`` with every alias followed, without expanding anything: each
    node's size is computed once. Raises on a cycle or above :data:`MAX_NODES`."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise RecipeError(f"{_where(name, node)}: a YAML alias refers to a node that contains it "
                              f"(a recursive structure); recipes cannot be recursive")
        on_path.add(key)
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item) for item in node.value)
        else:
            total = 1
        on_path.discard(key)
        if total > MAX_NODES:
            raise RecipeError(f"{_where(name, node)}: the YAML expands to more than {MAX_NODES:,} values once its "
                              f"aliases (*name) are followed; a recipe needs far fewer (alias expansion refused)")
        sizes[key] = total
        return total

    return size(root)


def _check_unique_keys(node: yaml.Node, name: str, seen: set[int]) -> None:
    """Refuse a mapping that gives a key twice (YAML would keep the last silently)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in keys:
                    first = keys[key_node.value].start_mark.line + 1
                    raise RecipeError(f"{_where(name, key_node)}: key {key_node.value!r} is given twice in the same "
                                      f"section (first at line {first}); give it once")
                keys[key_node.value] = key_node
            _check_unique_keys(key_node, name, seen)
            _check_unique_keys(value_node, name, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, name, seen)


def _key_lines(node: yaml.Node, path: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            out[path + (key,)] = key_node.start_mark.line + 1
            _key_lines(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[path + (str(index),)] = item.start_mark.line + 1
            _key_lines(item, path + (str(index),), out)


def _syntax_error(exc: yaml.YAMLError, name: str) -> RecipeError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return RecipeError(f"{name}{line}: YAML syntax error: {problem}")


def load(text: str, name: str) -> tuple[object, dict[tuple[str, ...], int] | None]:
    """Parse ``text`` (one YAML document) into Python values and the line of every key path;
    ``name`` is what errors call the text (a file name). An empty document gives (None, None)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _expanded_size(node, name)
        _check_unique_keys(node, name, set())
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, name) from None
    except RecursionError:
        raise RecipeError(f"{name}: the YAML is nested too deeply to be a recipe") from None
    finally:
        loader.dispose()
    lines: dict[tuple[str, ...], int] = {}
    _key_lines(node, (), lines)
    return data, lines


def load_value(text: str, name: str):
    """One value written on the command line (an override's right-hand side), with the same bounds."""
    return load(text, name)[0]
