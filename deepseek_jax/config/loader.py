"""The strict YAML loader: files -> merged dict -> typed, checked Config (and back to YAML).

A YAML file may hold any of the sections `model`, `mesh`, `data`, `optim`, `train` and an
`include:` list of files (relative to it) merged first, left to right. `a.b=value` overrides come
last. Unknown keys are errors that name the key, the file it came from and the nearest valid keys.
Every Config it returns has passed its sections' invariants and the cross-section checks (checks.py).
File names and includes expand `~`; numbers must be finite; a bad YAML value is a one-line ConfigError.
"""

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from deepseek_jax.config.checks import check_config
from deepseek_jax.config.errors import ConfigError
from deepseek_jax.config.errors import require as _check
from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.run import Config


def _merge(base: dict, new: dict, origin: dict, src: str, prefix: str = "") -> dict:
    """Deep-merges `new` over `base`, recording which source set each leaf."""
    out = dict(base)
    for key, value in new.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origin, src, path + ".")
        else:
            out[key] = value
            origin[path] = src
            if isinstance(value, dict):
                for sub in _leaf_paths(value, path + "."):
                    origin[sub] = src
    return out


def _leaf_paths(d: dict, prefix: str) -> list[str]:
    paths = []
    for k, v in d.items():
        paths.append(prefix + k)
        if isinstance(v, dict):
            paths.extend(_leaf_paths(v, f"{prefix}{k}."))
    return paths


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: its problem and where (PyYAML's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def _read_yaml(path: Path, origin: dict, seen: tuple[Path, ...] = ()) -> dict:
    path = path.expanduser().resolve()
    _check(not path.is_dir(), f"config file {path} is a directory")
    _check(path.is_file(), f"config file not found: {path}")
    _check(path not in seen, f"config include cycle: {' -> '.join(map(str, seen + (path,)))}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    _check(isinstance(raw, dict), f"{path}: top level must be a mapping, got {type(raw).__name__}")
    includes = raw.pop("include", []) or []
    includes = [includes] if isinstance(includes, str) else includes
    _check(isinstance(includes, list), f"{path}: include must be a file name or a list of them")
    merged: dict = {}
    for inc in includes:
        _check(isinstance(inc, str), f"{path}: include entries must be file names, got {inc!r}")
        merged = _merge(merged, _read_yaml(path.parent / Path(inc).expanduser(), origin, seen + (path,)), {}, str(path))
    return _merge(merged, raw, origin, str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML)."""
    key, sep, value = text.partition("=")
    _check(bool(sep) and bool(key), f"override {text!r} is not of the form a.b=value")
    try:
        return key.strip().split("."), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(e)})") from None


def _set_path(d: dict, keys: list[str], value: Any, done: str = "") -> dict:
    out = dict(d)
    if len(keys) == 1:
        out[keys[0]] = value
    else:
        sub = out.get(keys[0], {})
        where = done + keys[0]
        _check(isinstance(sub, dict), f"override {where}.{'.'.join(keys[1:])}: {where} is not a section")
        out[keys[0]] = _set_path(sub, keys[1:], value, where + ".")
    return out


def _coerce(tp, value, where: str):
    """Checks `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) or origin in (typing.Union, types.UnionType):
        return value
    if origin is Literal:
        _check(value in typing.get_args(tp), f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if tp in SCALARS:
        return SCALARS[tp](value, where)
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else Any
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, list):  # nested lists (mesh rule targets) become tuples: configs hash
        return tuple(_coerce(Any, v, where) for v in value)
    return value


def _float(value, where: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    _check(ok, f"{where}: expected a number, got {value!r}")
    _check(math.isfinite(value), f"{where}: must be a finite number, got {value}")
    return float(value)


def _int(value, where: str) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    _check(ok, f"{where}: expected an integer, got {value!r}")
    _check(abs(value) < 2**63, f"{where}: {value} is out of range (|value| < 2**63)")
    return value


def _typed(tp: type, what: str):
    def coerce(value, where: str):
        _check(isinstance(value, tp), f"{where}: expected {what}, got {value!r}")
        return value

    return coerce


# scalar annotation -> its check; a list is never a scalar (YAML `[1]` for an int is an error, not a tuple)
SCALARS = {float: _float, int: _int, bool: _typed(bool, "true/false"), str: _typed(str, "a string")}


def build(cls, data: dict, origin: dict | None = None, prefix: str = ""):
    """Builds dataclass `cls` from a nested dict, strictly."""
    origin = origin or {}
    _check(isinstance(data, dict), f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            path = prefix + str(key)
            near = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {path!r} (from {origin.get(path, 'code')}){hint}")
    kwargs = {}
    for name, value in data.items():
        where = f"{prefix}{name} (from {origin.get(prefix + name, 'code')})"
        tp = hints[name]
        if value is not None and typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)  # `X | None`
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, origin, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(tp, value, where)
    missing = [
        f.name
        for f in fields.values()
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    _check(not missing, f"missing config keys: {', '.join(prefix + m for m in missing)}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        srcs = sorted({v for k, v in origin.items() if k.startswith(prefix)})
        raise ConfigError(f"{e} (from {', '.join(srcs) or 'code'})") from None


def load_dict(paths: list[str | Path], overrides: list[str] = ()) -> tuple[dict, dict]:
    """Merged raw dict and the origin of every key, from files then overrides."""
    origin: dict = {}
    merged: dict = {}
    for p in paths:
        merged = _merge(merged, _read_yaml(Path(p), origin), {}, str(p))
    for text in overrides:
        keys, value = parse_override(text)
        merged = _set_path(merged, keys, value)
        origin[".".join(keys)] = f"override {text!r}"
    return merged, origin


def load_config(paths: list[str | Path], overrides: list[str] = ()) -> Config:
    """Loads a full run config (model + mesh + data + optim + train)."""
    merged, origin = load_dict(paths, overrides)
    return check_config(build(Config, merged, origin), origin)


def load_model_config(paths: list[str | Path], overrides: list[str] = ()) -> ModelConfig:
    """Loads just the `model` section (files may hold other sections; they are ignored)."""
    merged, origin = load_dict(paths, overrides)
    _check("model" in merged, f"no `model:` section in {', '.join(map(str, paths))}")
    sections = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(merged) - sections)
    _check(not unknown, f"unknown top-level section(s) {unknown} (from {[origin.get(k, k) for k in unknown]}); "
           f"sections are {sorted(sections)} (overrides need the prefix, e.g. model.dim=64)")
    return build(ModelConfig, merged["model"], origin, "model.")


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples become lists) that `build` accepts back."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg) -> str:
    """The resolved config as YAML (stored with checkpoints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
