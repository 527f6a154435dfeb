"""Command-line flags generated from a dataclass (EngineArgs), so no option is restated.

A field ``max_num_seqs: int = 256`` becomes ``--max-num-seqs N`` (default 256); a ``bool``
field becomes ``--name`` / ``--no-name``; ``int | None`` fields take an int or stay None;
the field's ``help`` and ``choices`` metadata go to argparse as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _scalar_type(hint: Any) -> type:
    """``int | None`` -> int; ``float`` -> float."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"cannot make a flag for a field of type {hint}")
        return args[0]
    return hint


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type,
                            title: str, skip: frozenset[str] = frozenset()) -> None:
    """One flag per field of dataclass ``cls`` (except ``skip``), in an argument group."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _scalar_type(hints[f.name])
        doc = dict(f.metadata)
        help_text = str(doc.pop("help", ""))
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                               help=help_text)
        else:
            shown = "" if f.default is None else f" (default: {f.default})"
            group.add_argument(flag, type=kind, default=f.default, help=help_text + shown,
                               **doc)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """An instance of ``cls`` from the parsed flags (fields absent from ``args`` keep their
    defaults; ``overrides`` win)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
