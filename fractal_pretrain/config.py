"""Config helpers shared by every dataclass config: one-line errors, dotted overrides, YAML loading."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad config key or value. The message is one line naming the key, the value and what is allowed."""


def check_range(name: str, value, low=None, high=None, *, integer: bool = False) -> None:
    """Raise ConfigError unless low <= value <= high (either bound may be None)."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        wanted = "an integer" if integer else "a number"
        raise ConfigError(f"{name}={value!r}: must be {wanted}")
    if not math.isfinite(value):  # NaN passes every comparison below (a YAML .nan or .inf is a float)
        raise ConfigError(f"{name}={value!r}: must be a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigError(f"{name}={value!r}: must be in {bounds}")


def check_pair(name: str, pair, low=None, high=None) -> None:
    """A (lo, hi) range with lo <= hi, both within [low, high]."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ConfigError(f"{name}={pair!r}: must be a pair [low, high]")
    for value in pair:
        check_range(name, value, low, high)
    if pair[0] > pair[1]:
        raise ConfigError(f"{name}={list(pair)!r}: low must not exceed high")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: must be one of {', '.join(map(str, allowed))}")


def check_device(name: str, value, *, also: tuple[str, ...] = ()) -> str:
    """``value`` if it names a device as configs spell it: auto, cpu, cuda or cuda:N (available or not; that is
    checked where it is used), or one of ``also`` (``model.render_device``: cpu-reference); else a one-line
    ConfigError naming ``name`` and the forms allowed."""
    forms = ["auto", "cpu", *also, "cuda"]
    if not isinstance(value, str) or not (value in forms or re.fullmatch(r"cuda:\d+", value)):
        raise ConfigError(f"{name}={value!r}: must be {', '.join(forms)} or cuda:N")
    return value


def _coerce(cls, name: str, value):
    """Turn YAML/CLI values into the field's declared type (lists -> tuples for pairs)."""
    hint = typing.get_type_hints(cls).get(name)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X] -> X
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def replace_checked(config, overrides: dict[str, Any] | None):
    """dataclasses.replace with unknown keys reported by name, values coerced to the field types."""
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} for {type(config).__name__}; allowed: {', '.join(sorted(fields))}"
        )
    cls = type(config)
    return dataclasses.replace(config, **{k: _coerce(cls, k, v) for k, v in overrides.items()})


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping, with an error that names the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def check_type(name: str, value, kind: type | tuple[type, ...], what: str) -> None:
    """Raise ConfigError unless ``value`` is a ``kind`` (bools are not ints here)."""
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{name}={value!r}: must be {what}")
    if not isinstance(value, kind):
        raise ConfigError(f"{name}={value!r}: must be {what}")


def build_checked(cls, data: Any, where: str):
    """``cls(**data)`` for a frozen config dataclass, every error one line starting with ``where``.

    ``data`` must be a mapping (None = all defaults); an unknown key names the allowed ones, a missing
    required key is named, a bad value is reported by ``cls.__post_init__`` (ConfigError naming key and
    value), YAML lists become tuples where the field is a tuple. ``where`` says which block it was
    (``"grid.yaml: methods.patchcore"``, ``"patchcore config"``).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(names))})")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: needs {missing[0]!r}")
    try:
        return cls(**{k: _coerce(cls, k, v) for k, v in data.items()})
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
