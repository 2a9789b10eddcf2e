"""Reading a YAML config into its pydantic model: every problem is one ConfigError naming file, line and field;
`Strict`, the base of every config section, refuses keys it does not know."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
)

from dnc_ray.infra.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")



C = TypeVar("C", bound=BaseModel)


def load_config(path: str | Path, cls: type[C]) -> C:
    """Read a YAML file into `cls`; every problem becomes a ConfigError naming file, line, field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the config as UTF-8") from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    duplicate = _duplicate_key(root)
    if duplicate:
        line, field = duplicate
        raise ConfigError(f"{path}: line {line}: duplicate key `{field}` (each key may appear once)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(path, root, e)) from None


def _duplicate_key(node: yaml.Node | None, prefix: str = "", visited: set | None = None) -> tuple[int, str] | None:
    """(1-based line, dotted field) of the first key repeated in a mapping (YAML itself lets the last one win)."""
    visited = set() if visited is None else visited
    if id(node) in visited:  # an alias seen before (anchors may even nest)
        return None
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name != "<<":
                if name in seen:
                    return key.start_mark.line + 1, f"{prefix}{name}"
                seen.add(name)
            found = _duplicate_key(value, f"{prefix}{name}." if name is not None else prefix, visited)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found = _duplicate_key(item, f"{prefix}{index}.", visited)
            if found:
                return found
    return None


def _describe(path: Path, root: yaml.Node, error: ValidationError) -> str:
    lines = [f"{path}: invalid config"]
    for err in error.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p in ("openai", "hf", "reference"))]
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(root, loc)
        where = f"line {line}, " if line else ""
        lines.append(f"  {where}field `{field}`: {err['msg']}")
    return "\n".join(lines)


def _line_of(node: yaml.Node | None, loc: list) -> int | None:
    """1-based line of the deepest YAML node on the path `loc` that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = [(k, v) for k, v in node.value if k.value == str(key)]
        if not match:
            break
        key_node, node = match[0]
        line = key_node.start_mark.line + 1
    return line
