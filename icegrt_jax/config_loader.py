"""Loading a run configuration: YAML files and dotted command-line overrides into the typed
dataclasses of ``icegrt_jax.config``.

Precedence: dataclass defaults < the YAML file < overrides (``key.sub=value``, the value parsed as
YAML, so ``data.train_files=[a.jsonl,b.jsonl]`` and ``model.hf_path=null`` work). An unknown key,
a wrong-typed value, a value outside an enumeration or an inconsistent combination raises
``ConfigError`` with one line naming the source (file or override) and the full dotted key.
"""

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from icegrt_jax import files
from icegrt_jax.config import ConfigError, Problems, Schema


def load_config(schema_cls: type[Schema], path: str | None = None,
                overrides: Sequence[str] = (), section: str | None = None) -> Schema:
    """Build ``schema_cls`` from its defaults, the YAML file at ``path`` and dotted ``overrides``.

    A file may hold several runs' configs under top-level keys (``configs/demo.yaml`` has
    ``sft``, ``reward`` and ``ppo``): with ``section`` set, present in the file, and the file's
    keys not all fields of ``schema_cls`` (``PPOConfig`` has a field named ``ppo``), only that
    subtree is read (errors then name ``path[section]``).
    """
    config = OmegaConf.structured(schema_cls)
    if path is not None:
        loaded = _read_yaml(path)
        if _is_run_section(schema_cls, loaded, section):
            loaded, path = loaded[section], f"{path}[{section}]"
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path}: expected a mapping")
        config = _merge(schema_cls, config, loaded, path)
    for item in overrides:
        config = _merge(schema_cls, config, _parse_override(item), f"override '{item}'")
    result = OmegaConf.to_object(config)
    for key, message in _problems(result):
        raise ConfigError(f"{key}: {message}")
    return result


def _is_run_section(schema_cls: type, loaded: DictConfig, section: str | None) -> bool:
    return section is not None and section in loaded and holds_several_runs(schema_cls, loaded)


def holds_several_runs(schema_cls: type, loaded) -> bool:
    """Whether a config file's top-level keys are runs' sections, not all fields of ``schema_cls``."""
    return not set(loaded.keys()) <= {f.name for f in dataclasses.fields(schema_cls)}


def config_to_yaml(cfg: Any) -> str:
    """The YAML text of a resolved config; ``load_config`` of it gives back an equal config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def read_yaml_mapping(path: str) -> dict:
    """The YAML mapping at ``path`` as plain Python; ``ConfigError`` as ``load_config``'s."""
    return OmegaConf.to_container(_read_yaml(path))


def _read_yaml(path: str) -> DictConfig:
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such config file")
    with files.read_errors(path, ConfigError):
        try:
            loaded = OmegaConf.load(path)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({_one_line(str(e))})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def _parse_override(item: str) -> DictConfig:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override '{item}': expected key=value")
    if not all(item.split("=", 1)[0].split(".")):
        raise ConfigError(f"override '{item}': an empty part in the key (expected section.key=value)")
    try:
        return OmegaConf.from_dotlist([item])
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"override '{item}': {_one_line(str(e))}") from None


def _merge(schema_cls: type, config: DictConfig, update: DictConfig, source: str) -> DictConfig:
    """Merge ``update`` into ``config``; type and enumeration errors are blamed on ``source``."""
    try:
        merged = OmegaConf.merge(config, update)
        result = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_describe(schema_cls, e)}") from None
    for message in _value_errors(result):
        raise ConfigError(f"{source}: {message}")
    return merged


def _describe(schema_cls: type, error: OmegaConfBaseException) -> str:
    key = error.full_key
    if isinstance(error, ConfigKeyError) and key:
        return f"unknown key '{key}'"
    if isinstance(error, ValidationError) and key:
        return _type_mismatch(key, _field_type(schema_cls, key), error.value)
    return _one_line(str(error).splitlines()[0])


def _field_type(schema_cls: type, key: str) -> Any:
    """The annotated type at a dotted key such as ``mesh.rules[0][1]`` (None when unknown)."""
    tp: Any = schema_cls
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        if part.startswith("["):
            tp = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        elif dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
        else:
            return None
    return tp


def _type_mismatch(key: str, expected: Any, value: Any) -> str:
    return f"'{key}' expected {_type_name(expected)}, got {value!r}"


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", "a different type")


def _value_errors(cfg: Any, prefix: str = "") -> Iterator[str]:
    """Values that do not match their annotation (OmegaConf lets nested lists through) or choices."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key, value, allowed = prefix + f.name, getattr(cfg, f.name), f.metadata.get("choices")
        if dataclasses.is_dataclass(value):
            yield from _value_errors(value, key + ".")
        elif not _matches(value, hints[f.name]):
            yield _type_mismatch(key, hints[f.name], value)
        elif allowed and value not in allowed:
            yield f"'{key}' must be one of {', '.join(map(repr, allowed))}, got {value!r}"


def _matches(value: Any, tp: Any) -> bool:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, tp) and (tp is bool or not isinstance(value, bool))


def _problems(cfg: Any, prefix: str = "") -> Problems:
    """Every section's ``problems()``, keyed by full dotted key, after the one rule for all:
    every float is finite (a NaN passes every range check and trains a NaN model)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _problems(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            yield prefix + f.name, f"must be a finite number, got {value}"
    for key, message in getattr(cfg, "problems", lambda: ())():
        yield (prefix + key if key else prefix.rstrip(".") or "config"), message


def _one_line(text: str) -> str:
    return " ".join(text.split())
