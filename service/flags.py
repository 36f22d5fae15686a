"""Command-line flags over config dataclasses: each flag's default is read from its field, and
a dataclass is built back from the parsed flags by field name, so a default lives in one place.
A flag's dest is `Class.field`, so two dataclasses may share a field name (`seed`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


class HelpFormatter(argparse.HelpFormatter):
    """--help shows each flag's default, where it has a value to show (not for on/off
    switches, nor for None, whose meaning the help text says)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help = action.help or ""
        if action.nargs == 0 or action.default is None or "%(default)" in help or not action.option_strings:
            return help
        return help + " (default: %(default)s)"


def field_default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise ValueError(f"{cls.__name__} has no field {name!r}")


def field_flag(group: argparse._ActionsContainer, cls: type, name: str, *flags: str, **kwargs: Any) -> argparse.Action:
    """A flag (default `--field-name`) that sets `cls.name`, defaulting to the field's default."""
    kwargs.setdefault("default", field_default(cls, name))
    flags = flags or (f"--{name.replace('_', '-')}",)
    if kwargs.get("action") not in ("store_true", "store_false") and "choices" not in kwargs:
        kwargs.setdefault("metavar", flags[0].lstrip("-").replace("-", "_").upper())
    return group.add_argument(*flags, dest=f"{cls.__name__}.{name}", **kwargs)


def from_flags(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """`cls` built from every parsed flag of its fields, plus `overrides`."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        dest = f"{cls.__name__}.{f.name}"
        if hasattr(args, dest):
            values[f.name] = getattr(args, dest)
    return cls(**{**values, **overrides})
