"""Typed configs: dataclasses loaded from YAML plus dotted ``key=value`` overrides.

Every stage has a dataclass config. ``load_config(Cls, path, overrides)`` builds it,
checks every key and type, and calls ``validate()`` so that a bad config fails before
any cluster work starts, with a message naming the key to fix.

Fields declared with ``path_field()`` hold storage URIs. With ``resolve=True`` (what the
CLI does) relative local paths become absolute against the launch directory, so Ray
workers with another working directory read the same files.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Callable, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what to fix."""


class _RawOverride(str):
    """An override's text: parsed as YAML for typed fields, kept verbatim for str fields."""


_PATH = "pseudobox_path"
# The job supervisor sets this for a ``ray job submit`` entrypoint (and not for the job's
# tasks and actors); ray.dashboard.modules.job.job_supervisor._get_driver_env_vars.
RAY_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def path_field(default: str = "", *, default_factory: Callable[[], Any] | None = None,
               not_a_path: Callable[[str], bool] | None = None) -> Any:
    """A dataclass field holding a local path or URI (a str, or a list of them for
    ``default_factory=list``); ``not_a_path(value)`` marks values that are names instead
    (e.g. torchvision weights names), which are left alone."""
    meta = {_PATH: not_a_path or (lambda value: False)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def in_ray_job() -> bool:
    """True in the entrypoint of a ``ray job submit``, which runs in an uploaded copy of
    the working directory."""
    return RAY_JOB_ENV_VAR in os.environ


def path_keys(cfg, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of every ``path_field`` in ``cfg`` and its sections."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(cfg, f.name)
        if _PATH in f.metadata:
            out[key] = value
        elif dataclasses.is_dataclass(value):
            out.update(path_keys(value, key))
    return out


def resolve_paths(cfg, cwd: str | None = None, job: bool | None = None):
    """Make relative local paths of ``path_field`` fields absolute against ``cwd`` (default:
    the current directory), in place; URIs (``s3://``, ``file://``) stay as they are.

    Inside a Ray job (``job``, default: ``in_ray_job()``) a relative path is refused: the
    entrypoint runs in the job's uploaded copy of the working directory, where the data is
    not and where outputs would be lost.
    """
    cwd = os.getcwd() if cwd is None else cwd
    job = in_ray_job() if job is None else job

    def resolve(key: str, value: str, not_a_path) -> str:
        if not isinstance(value, str) or not value or "://" in value or not_a_path(value):
            return value
        if os.path.isabs(os.path.expanduser(value)):
            return os.path.expanduser(value)  # ~ of the launching user, not of each worker
        if job:
            raise ConfigError(
                f"{key}: relative path {value!r} inside a Ray job: the job runs in an uploaded copy of the "
                f"working directory, which holds neither your data nor outputs that outlast the job. "
                f"Use an absolute path that every node sees, or an s3:// URI"
                + ("" if "[" in key else f" (e.g. {key}=/shared/... or {key}=s3://bucket/...)"))
        return os.path.normpath(os.path.join(cwd, value))

    def walk(node, prefix: str) -> None:
        for f in dataclasses.fields(node):
            key = f"{prefix}.{f.name}" if prefix else f.name
            value = getattr(node, f.name)
            if _PATH in f.metadata:
                not_a_path = f.metadata[_PATH]
                if isinstance(value, (list, tuple)):
                    value = type(value)(resolve(f"{key}[{i}]", v, not_a_path) for i, v in enumerate(value))
                else:
                    value = resolve(key, value, not_a_path)
                object.__setattr__(node, f.name, value)
            elif dataclasses.is_dataclass(value):
                walk(value, key)

    walk(cfg, "")
    return cfg


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    """Convert a YAML/override value into ``tp`` or raise ``ConfigError`` naming ``key``."""
    if isinstance(value, _RawOverride):
        if tp is str:
            return str(value)
        value = yaml.safe_load(value) if value != "" else ""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if value is None:  # `tags:` with nothing after it
            value = []
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
            try:  # "1e4": PyYAML reads exponents without a dot as strings
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # YAML `use_gpu: true` into a field whose values are auto/true/false
            return "true" if value else "false"
        if value is None:  # `split:` with nothing after it: unset
            return ""
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in '{prefix}'" if prefix else ""
        raise ConfigError(f"unknown key(s) {unknown}{where}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        field = fields[name]
        if isinstance(value, dict) and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
            if dataclasses.is_dataclass(default):
                # A partial section keeps this stage's own defaults for the keys it omits.
                value = _merge(to_dict(default), value)
        kwargs[name] = _coerce(value, hints[name], key)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key(s) {[f'{prefix}.{m}' if prefix else m for m in missing]}")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{p}' is not a section")
    node[parts[-1]] = _RawOverride(raw)


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (for example train.lr=0.01)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls: type[T], path: str | None = None, overrides: list[str] | None = None,
                validate: bool = True, resolve: bool = False) -> T:
    """Build ``cls`` from a YAML file (any storage URI) and dotted overrides, then validate.

    ``resolve``: make relative ``path_field`` values absolute (``resolve_paths``) before
    validating; the file ``path`` itself is read relative to the current directory.
    """
    data: dict = {}
    if path:
        from pseudobox import storage

        try:
            text = storage.read_bytes(path).decode("utf-8")
        except storage.StorageError as e:
            raise ConfigError(f"config file {path} not found") from e
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _build(cls, data)
    if resolve:
        resolve_paths(cfg)
    if validate and hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    """A plain, YAML/JSON-serialisable dict (tuples become lists)."""
    def conv(v):
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


class _ConfigDumper(yaml.SafeDumper):
    """Sections as indented blocks, lists on one line (``scales: [288, 576]``)."""


_ConfigDumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def dump_config(cfg) -> str:
    """``cfg`` as YAML, every key in declaration order; ``load_config`` reads it back equal."""
    return yaml.dump(to_dict(cfg), Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)


def require(cond: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``cond``; used by ``validate()`` methods."""
    if not cond:
        raise ConfigError(message)


def from_dict(cls: type[T], data: dict) -> T:
    """Rebuild a config from ``to_dict`` output (e.g. inside a Ray worker)."""
    return _build(cls, data)
