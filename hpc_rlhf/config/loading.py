"""Loading a `Config`: YAML file, `--section.key=value` overrides, type checks, help text and printing.

Values are checked against the dataclass annotations as they arrive, so an error names the exact key and its source
(the YAML file or the command line). Cross-field rules run afterwards (`hpc_rlhf.config.checks`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from hpc_rlhf.config.checks import check_config
from hpc_rlhf.config.schema import Config, ConfigError

DEFAULT_SOURCE = "default"
CLI_SOURCE = "command line"


@dataclasses.dataclass
class LoadedConfig:
    """A validated config plus where each explicitly set key came from (for error messages and provenance)."""

    config: Config
    sources: dict[str, str]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Return (inner type, allows None) for Optional[X] / X | None annotations."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = tuple(a for a in args if a is not type(None))
        if len(rest) == 1:
            return rest[0], True
        if len(rest) < len(args):
            return typing.Union[rest], True
    return tp, False


def _is_str_or_str_list(tp: Any) -> bool:
    """True for `str | list[str]`: a key that takes one string or a list of them (e.g. reward.remote_url)."""
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {str, list[str]}


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    name = getattr(inner, "__name__", str(inner))
    if typing.get_origin(inner) is list:
        name = f"list[{typing.get_args(inner)[0].__name__}]"
    if _is_str_or_str_list(inner):
        name = "str or list[str]"
    return f"{name} or empty" if optional else name


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against annotation `tp`; return the value converted where that is lossless (int -> float)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} ({source}): must be set, got empty (expected {_type_name(tp)})")
    bad = ConfigError(f"{key} ({source}): expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if inner is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if inner is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if inner is str:
        if not isinstance(value, str):
            hint = " (quote it in YAML: values like 24:00:00 otherwise parse as numbers)"
            raise ConfigError(f"{key} ({source}): expected a string, got {type(value).__name__} {value!r}{hint}")
        return value
    if typing.get_origin(inner) is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        item_tp = typing.get_args(inner)[0]
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if _is_str_or_str_list(inner):
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)):
            return [_coerce(v, str, f"{key}[{i}]", source) for i, v in enumerate(value)]
        raise bad
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _field_meta(cls: type, name: str) -> dict:
    return next(f.metadata for f in dataclasses.fields(cls) if f.name == name)


def _unknown_key(key: str, choices: Sequence[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], choices, n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return ConfigError(f"{key} ({source}): unknown key{hint}; known keys here: {', '.join(choices)}")


def _set_leaf(cfg: Config, key: str, value: Any, source: str, sources: dict[str, str]) -> None:
    """Set one dotted key to a type-checked value; a mapping given for a section descends into it."""
    obj: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        path = ".".join(parts[: depth + 1])
        if part not in names:
            raise _unknown_key(path, names, source)
        current = getattr(obj, part)
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(current):
            if last:
                raise ConfigError(f"{path} ({source}): is a section; expected a mapping of keys, "
                                  f"got {type(value).__name__} {value!r}")
            obj = current
            continue
        if not last:
            raise ConfigError(f"{path} ({source}): is a value, not a section")
        checked = _coerce(value, typing.get_type_hints(type(obj))[part], key, source)
        choices = _field_meta(type(obj), part).get("choices")
        if choices is not None and checked not in choices:
            raise ConfigError(f"{key} ({source}): {checked!r} is not one of {', '.join(map(str, choices))}")
        setattr(obj, part, checked)
        sources[key] = source


def _flatten(cfg: Config, mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) leaves of a nested mapping; mappings under section keys are walked into."""
    leaves = []
    for raw_key, value in mapping.items():
        key = f"{prefix}{raw_key}"
        if isinstance(value, dict) and dataclasses.is_dataclass(_lookup(cfg, key)):
            leaves += _flatten(cfg, value, key + ".")
        else:
            leaves.append((key, value))
    return leaves


def _lookup(cfg: Config, key: str) -> Any:
    """The current value at a dotted key, or None when the key does not exist."""
    obj: Any = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return None
        obj = getattr(obj, part)
    return obj


def apply_mapping(cfg: Config, mapping: dict, source: str, sources: dict[str, str]) -> list[str]:
    """Apply a nested dict (a YAML document) to cfg; return all errors instead of stopping at the first."""
    if not isinstance(mapping, dict):
        return [f"({source}): the top level must be a mapping of sections, got {type(mapping).__name__}"]
    errors = []
    for key, value in _flatten(cfg, mapping):
        try:
            _set_leaf(cfg, key, value, source, sources)
        except ConfigError as err:
            errors.append(str(err))
    return errors


def _field_type(cfg: Config, key: str) -> Any:
    """The annotation of a dotted key, or None when the key does not exist."""
    obj: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return None
        if i == len(parts) - 1:
            return typing.get_type_hints(type(obj))[part]
        obj = getattr(obj, part)
    return None


def parse_override_value(raw: str, tp: Any) -> Any:
    """Turn a command-line string into a value: strings stay verbatim, everything else is read as YAML."""
    inner, optional = _unwrap_optional(tp) if tp is not None else (None, False)
    if optional and raw.strip().lower() in ("", "null", "none", "~"):
        return None
    if inner is str or _is_str_or_str_list(inner):  # a comma-separated list stays one string, split by its user
        return raw
    return yaml.safe_load(raw) if raw != "" else None


def split_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """Parse `--a.b=v`, `--a.b v` and bare boolean `--a.b` into (key, raw value) pairs."""
    pairs = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"{arg} ({CLI_SOURCE}): expected --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, raw = body, argv[i + 1]
            i += 2
        else:
            key, raw = body, "true"
            i += 1
        pairs.append((key, raw))
    return pairs


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> LoadedConfig:
    """Defaults <- YAML file <- overrides, then type and cross-field checks. Raises ConfigError listing every problem."""

    cfg = Config()
    sources: dict[str, str] = {}
    errors: list[str] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        errors += apply_mapping(cfg, document, str(path), sources)
    try:
        pairs = split_overrides(list(overrides))
    except ConfigError as err:
        errors.append(str(err))
        pairs = []
    for key, raw in pairs:
        tp = _field_type(cfg, key)
        try:
            value = parse_override_value(raw, tp)
        except yaml.YAMLError:
            errors.append(f"{key} ({CLI_SOURCE}): cannot read value {raw!r}")
            continue
        try:
            _set_leaf(cfg, key, value, CLI_SOURCE, sources)
        except ConfigError as err:
            errors.append(str(err))
    if not errors:
        errors += check_config(cfg, sources)
    if errors:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}:\n  - " + "\n  - ".join(errors))
    return LoadedConfig(cfg, sources)


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (for YAML printing, checkpoints and logs)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def describe_keys(cfg_cls: type = Config, prefix: str = "") -> list[str]:
    """One line per key: `--section.key  (type, default ...)  description [choices]`, for --help."""
    lines = []
    defaults = cfg_cls()
    for f in dataclasses.fields(cfg_cls):
        value = getattr(defaults, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            doc = (type(value).__doc__ or "").strip().splitlines()[0]
            if not prefix:
                lines.append(f"\n{f.name}: {doc}")
            lines += describe_keys(type(value), key + ".")
            continue
        tp = typing.get_type_hints(cfg_cls)[f.name]
        choices = f.metadata.get("choices")
        extra = f" [{' | '.join(map(str, choices))}]" if choices else ""
        default = "empty" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  --{key:<44} {_type_name(tp)}, default {default}. {f.metadata.get('help', '')}{extra}")
    return lines
