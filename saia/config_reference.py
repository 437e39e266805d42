"""Writes docs/configuration.md from the config models, so the reference never drifts.

`python -m saia.config_reference > docs/configuration.md`; a test checks the file is current.
"""

from __future__ import annotations

import importlib
import sys
import types
import typing
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

# (title, "module:Model", file the operator writes)
ROOTS: list[tuple[str, str, str]] = [
    ("Agent (login node)", "hpc.config:AgentConfig", "saia-agent.yaml"),
    ("Hub (cloud server)", "hub.config:HubConfig", "hub.yaml"),
]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(arg) for arg in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _field_type(field: FieldInfo) -> str:
    for meta in field.metadata:
        if getattr(getattr(meta, "func", None), "__name__", "") == "_duration":
            return "duration"
    return _type_name(field.annotation)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
        if isinstance(value, BaseModel):
            return "(see below)"
        return f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "**required**"
    if isinstance(field.default, PurePath):  # as written in the file, not PosixPath('...')
        return f"`{str(field.default)!r}`"
    return f"`{field.default!r}`"


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_nested_models(arg))
    return found


def _describe(model: type[BaseModel], path: str, out: list[str], seen: set[str]) -> None:
    out.append(f"### `{path}`\n" if path else "### top level\n")
    doc = (model.__doc__ or "").strip().splitlines()
    if doc:
        out.append(doc[0] + "\n")
    out.append("| key | type | default | meaning |\n|---|---|---|---|")
    children: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        type_name = _field_type(field).replace("|", "\\|")
        out.append(f"| `{name}` | {type_name} | {_default(field)} | {meaning} |")
        origin = typing.get_origin(field.annotation)
        for child in _nested_models(field.annotation):
            suffix = "[]" if origin is list else ".<name>" if origin is dict else ""
            children.append((f"{path}.{name}{suffix}" if path else name + suffix, child))
    out.append("")
    for child_path, child in children:
        if child.__name__ not in seen:
            seen.add(child.__name__)
            _describe(child, child_path, out, seen)


def render() -> str:
    out = [
        "# Configuration reference\n",
        "Generated from the config models by `python -m saia.config_reference`; "
        "do not edit by hand. Durations take `30s`, `10m`, `1h`, `H:MM:SS` or seconds.\n",
    ]
    for title, target, filename in ROOTS:
        module_name, _, class_name = target.partition(":")
        try:
            model = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        out.append(f"## {title}: `{filename}`\n")
        _describe(model, "", out, {model.__name__})
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
