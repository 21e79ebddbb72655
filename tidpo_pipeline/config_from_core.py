"""Dagster configs derived from tidpo_core's dataclasses, so that each setting is declared once.

A field of a core dataclass (its type, default and the docstring under it) becomes a field of the
Dagster config with the same name: adding an engine option makes it settable in the Launchpad without a
second declaration, and the two cannot drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

import dagster as dg
from pydantic import ConfigDict, Field, create_model


class DocumentedConfig(dg.Config):
    """A Dagster config whose field docstrings are the descriptions the Launchpad shows."""

    model_config = ConfigDict(**dg.Config.model_config, use_attribute_docstrings=True)


@cache
def attribute_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a class's fields (`x: int = 0` then `\"\"\"what x is\"\"\"`), its base
    classes' included (a settings dataclass that extends another keeps the other's descriptions)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object:
            docs.update(_own_attribute_docs(klass))
    return docs


def _own_attribute_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen app): the fields keep no description
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def core_fields(
    cls: type,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """Pydantic field definitions (type, Field) for the dataclass `cls`'s fields, in declaration order.

    `include` keeps only those fields, `exclude` drops some, `defaults` replaces a field's default (for a
    config whose purpose needs another starting value: a short comparison run, for instance).
    """
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    wanted = None if include is None else set(include)
    skipped = set(exclude)
    defaults = dict(defaults or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = ((wanted or set()) | skipped | set(defaults)) - known
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    out: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(cls):
        if (wanted is not None and f.name not in wanted) or f.name in skipped:
            continue
        description = docs.get(f.name)
        if f.name in defaults:
            value = defaults[f.name]
            if isinstance(value, list):
                info = Field(default_factory=lambda v=value: list(v), description=description)
            else:
                info = Field(default=value, description=description)
        elif f.default is not dataclasses.MISSING:
            info = Field(default=f.default, description=description)
        elif f.default_factory is not dataclasses.MISSING:
            info = Field(default_factory=f.default_factory, description=description)
        else:
            raise ValueError(f"{cls.__name__}.{f.name} has no default: a Dagster config field needs one")
        out[f.name] = (hints[f.name], info)
    return out


def config_class(name: str, doc: str, base: type, *groups: Mapping[str, tuple[Any, Any]]) -> type:
    """A Dagster config class: `base` (a dg.Config with the asset's own settings) plus field groups
    derived from core dataclasses (a later group wins on a name two share)."""
    merged: dict[str, tuple[Any, Any]] = {}
    for group in groups:
        merged.update(group)
    clash = set(merged) & set(base.model_fields)  # type: ignore[attr-defined]
    if clash:
        raise ValueError(f"{name}: {sorted(clash)} are declared by both {base.__name__} and a core dataclass")
    return create_model(name, __base__=base, __doc__=doc, __module__=base.__module__, **merged)  # type: ignore[call-overload]
