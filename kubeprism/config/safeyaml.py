"""Reading YAML that people and other programs wrote: size limits, duplicate keys refused,
alias bombs measured, and error text that never quotes the document (it may hold secrets).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from kubeprism.base.atomic import read_limited
from kubeprism.config.values import ConfigError

# Far more values than any real config holds, far fewer than a YAML alias bomb expands to:
# validating (and quoting in errors) such a document would hang the daemon, a running
# one too on SIGHUP.
MAX_DOCUMENT_VALUES = 100_000
# A real config is a few KiB; reading more (a wrong path, /dev/zero) only wastes time.
MAX_CONFIG_BYTES = 256 * 1024
# A real config nests four or five levels deep. PyYAML's scanner costs time in proportion to
# the open flow collections for every token (`[` x 30,000 took seconds), and its composer and
# constructor recurse once per level, so deeper documents are refused while still being read.
MAX_NESTING = 64


@contextlib.contextmanager
def file_named_by(key: str, path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Turn a failure to use a file the config names into a ConfigError naming key and file.

    ssl.SSLError is an OSError; ValueError covers undecodable text and bad base64.
    """
    try:
        yield
    except (OSError, ValueError, yaml.YAMLError) as exc:
        detail = (exc.strerror if isinstance(exc, OSError) else None) or exc
        if isinstance(exc, yaml.YAMLError):  # PyYAML quotes the line: it may be a secret
            detail = yaml_error_text(exc)
        raise ConfigError(key, f"cannot use {path}: {detail}") from exc


def read_document(path: str | Path) -> object:
    """The parsed YAML of a config file; ConfigError for anything that keeps it from being one."""
    try:
        text = read_limited(path, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError(
            "", f"cannot read config file {str(path)!r}: {exc.strerror or exc}"
        ) from exc
    try:
        data = yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass
        size = _expanded_size(data, {})
    except DuplicateKeyError as exc:
        raise ConfigError(exc.key, f"duplicate key in {path} (line {exc.line})") from None
    except NestingError as exc:
        raise ConfigError(
            "", f"{path} is nested too deeply to be a kubeprism config: {exc}"
        ) from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: 2001-02-30, a 5000-digit number
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from exc
    except RecursionError as exc:  # aliases nest beyond MAX_NESTING: a: &a [[*a]], b: [[*a]]
        raise ConfigError("", f"{path} is nested too deeply to be a kubeprism config") from exc
    if size > MAX_DOCUMENT_VALUES:
        raise ConfigError(
            "", f"{path} expands to more than {MAX_DOCUMENT_VALUES} values (YAML aliases?)"
        )
    return data


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (YAML says it is an error; PyYAML keeps the last)."""

    def __init__(self, key: str, line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line}")
        self.key, self.line = key, line


class NestingError(yaml.MarkedYAMLError):
    """Collections nest more than MAX_NESTING deep; str() names the line, never quotes it."""

    def __init__(self, mark: yaml.Mark) -> None:
        super().__init__(problem=f"more than {MAX_NESTING} levels", problem_mark=mark)

    def __str__(self) -> str:
        mark = self.problem_mark
        assert mark is not None
        return f"{self.problem} at line {mark.line + 1}, column {mark.column + 1}"


class ShallowLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents nested more than MAX_NESTING deep, fast."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # Checked while scanning: the scanner is where deep flow nesting costs (see MAX_NESTING).
        if self.flow_level >= MAX_NESTING:
            raise NestingError(self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # Block collections (`- - - - 1`, indentation) are cheap to scan but recurse here;
        # _depth counts the collections this node is inside.
        if self._depth >= MAX_NESTING and self.check_event(yaml.CollectionStartEvent):
            raise NestingError(self.get_mark())
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class StrictLoader(ShallowLoader):
    """ShallowLoader that refuses duplicate mapping keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise DuplicateKeyError(str(key)[:80], key_node.start_mark.line + 1)
            if isinstance(key, str | int | float | bool):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """Where a YAML document is broken, without quoting it (it may hold a secret)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
    problem = str(getattr(exc, "problem", None) or "syntax error")
    # Problems quote the text they tripped on ('found undefined alias 'tok3n''): drop it.
    return f"not valid YAML at {where}: " + _QUOTED.sub("'…'", problem)


def _expanded_size(data: object, seen: dict[int, int]) -> int:
    """How many values the document holds with every alias expanded, in linear time."""
    if not isinstance(data, dict | list):
        return 1
    if id(data) in seen:
        return seen[id(data)]
    seen[id(data)] = 1  # a node that contains itself counts once, not forever
    children = [*data.keys(), *data.values()] if isinstance(data, dict) else data
    seen[id(data)] = size = 1 + sum(_expanded_size(child, seen) for child in children)
    return size
