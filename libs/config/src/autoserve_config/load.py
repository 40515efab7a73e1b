"""Reading the YAML file, and the JSON form an app's spec takes in the KV bucket."""

from __future__ import annotations

from pathlib import Path

import msgspec
import yaml

from .model import AppSpec, Config, DetectorConfig
from .validate import ConfigError, parse_app_spec, parse_config


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; ``ConfigError`` lists every problem."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return load_config_text(text, str(path))


def load_config_text(text: str, source: str = "<config>") -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}{where}: not valid YAML: {problem}"]) from None
    return parse_config(raw)


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
