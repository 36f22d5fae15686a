"""Find scheduler plugins by name through entry points (group `tandem.schedulers`)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType

from tandem.engine.errors import TandemError
from tandem.schedulers.api import API_VERSION, SUPPORTED_API_VERSIONS, Scheduler

ENTRY_POINT_GROUP = "tandem.schedulers"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class SchedulerLoadError(TandemError, ValueError):
    """Unknown scheduler or option, a bad option value, or an API version mismatch."""


def available_schedulers() -> dict[str, EntryPoint]:
    """Installed schedulers by name (the built-in ones register the same way as plugins)."""
    return {ep.name: ep for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)}


def load_class(name: str) -> type[Scheduler]:
    found = available_schedulers()
    if name not in found:
        hint = "" if found else " (is the tandem package installed? its built-in schedulers are entry points)"
        raise SchedulerLoadError(f"unknown scheduler {name!r}; installed: {', '.join(found) or 'none'}{hint}")
    return check_class(name, found[name].load(), found[name].value)


def check_class(name: str, cls: object, origin: str = "") -> type[Scheduler]:
    """`cls` as a scheduler class, or SchedulerLoadError: not a Scheduler, or an API version
    this tandem does not load."""
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
        raise SchedulerLoadError(f"scheduler {name!r} ({origin or cls!r}) is not a Scheduler subclass")
    if cls.api_version not in SUPPORTED_API_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_API_VERSIONS))
        raise SchedulerLoadError(
            f"scheduler {name!r} targets plugin API version {cls.api_version}; this tandem provides {API_VERSION} "
            f"and loads {supported}"
        )
    return cls


def options_of(cls: type[Scheduler]) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items() if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _convert(name: str, option: str, raw: object, default: object) -> object:
    if not isinstance(raw, str) or default is inspect.Parameter.empty or isinstance(default, str):
        return raw
    try:
        if isinstance(default, bool):
            lowered = raw.lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError(raw)
            return lowered in _TRUE
        if isinstance(default, (int, float)):
            return type(default)(raw)
    except ValueError:
        raise SchedulerLoadError(
            f"scheduler {name!r} option {option!r} takes a {type(default).__name__}, got {raw!r}"
        ) from None
    return raw


def load_scheduler(name: str, options: Mapping[str, object] | None = None) -> Scheduler:
    """An instance of the named scheduler; string option values are converted to the type
    of the option's default."""
    cls = load_class(name)
    known = options_of(cls)
    open_ended = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    kwargs = {}
    for key, raw in (options or {}).items():
        if key not in known and open_ended:  # passed through (async-overlap: to its policy)
            kwargs[key] = raw
            continue
        if key not in known:
            valid = ", ".join(known) or "none"
            raise SchedulerLoadError(f"scheduler {name!r} has no option {key!r}; its options: {valid}")
        kwargs[key] = _convert(name, key, raw, known[key].default)
    try:
        scheduler = cls(**kwargs)
    except SchedulerLoadError:
        raise
    except (TypeError, ValueError) as exc:
        raise SchedulerLoadError(f"scheduler {name!r}: {exc}") from exc
    try:
        scheduler.loaded_with = MappingProxyType(dict(options or {}))
    except AttributeError:  # a plugin with __slots__ or its own read-only attribute: it reports none
        pass
    return scheduler


def parse_options(pairs: list[str]) -> dict[str, str]:
    """`["k=v", ...]` as given to --scheduler-opt."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SchedulerLoadError(f"scheduler option {pair!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out
