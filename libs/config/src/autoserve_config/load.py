"""Reading the YAML file, and the JSON form an app's spec takes in the KV bucket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import yaml

from .model import AppSpec, Config, DetectorConfig
from .validate import ConfigError, parse_app_spec, parse_config_file

_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key repeated in one mapping. PyYAML keeps the
    last value silently, so a pasted block could override a port unseen; here every
    repeat is collected (``duplicates``) with its path and line."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []  # (line, problem)
        self._paths: dict[int, str] = {}

    def construct_document(self, node: yaml.Node) -> Any:
        self._paths = _node_paths(node)  # construct_mapping sees one node, not where it sits
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self._note_duplicates(node)  # before flatten_mapping adds the `<<` merged keys
        return super().construct_mapping(node, deep=deep)

    def _note_duplicates(self, node: yaml.MappingNode) -> None:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue  # a merge key may override; complex keys are refused later anyway
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                path = _join(self._paths.get(id(node), ""), key_node.value)
                self.duplicates.append((line, f"{path}: duplicate key (line {line}), first on line {first_line[key]}"))
            else:
                first_line[key] = line


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _node_paths(root: yaml.Node) -> dict[int, str]:
    """Each collection node's path (``apps.web.instances[0]``), in document order; an
    aliased node keeps the path of its anchor."""
    paths: dict[int, str] = {}
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in paths or isinstance(node, yaml.ScalarNode):
            continue
        paths[id(node)] = path
        if isinstance(node, yaml.MappingNode):
            children = [(v, _join(path, k.value if isinstance(k, yaml.ScalarNode) else "?")) for k, v in node.value]
        else:
            children = [(item, f"{path}[{index}]") for index, item in enumerate(node.value)]
        stack.extend(reversed(children))
    return paths


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; ``ConfigError`` lists every problem."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return load_config_text(text, str(path))


def load_yaml(text: str, source: str = "<config>") -> Any:
    """The YAML document, or ``ConfigError``: not YAML (with its line), or repeated keys."""
    loader = StrictLoader(text)
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}{where}: not valid YAML: {problem}"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError([problem for _, problem in sorted(loader.duplicates)])
    return raw


def load_config_text(text: str, source: str = "<config>") -> Config:
    return parse_config_file(load_yaml(text, source), source)


def encode_app_spec(spec: AppSpec) -> bytes:
    return msgspec.json.encode(spec)


def decode_app_spec(app_name: str, data: bytes) -> AppSpec:
    """Decode and validate a KV value; ``ConfigError`` names the problems."""
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise ConfigError([f"apps.{app_name}: not valid JSON: {exc}"]) from None
    return parse_app_spec(app_name, raw)


def encode_detector(detector: DetectorConfig) -> bytes:
    return msgspec.json.encode(detector)
