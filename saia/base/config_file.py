"""What the agent's and the hub's YAML config files share: reading, validating, errors.

Every problem becomes one line `FILE: KEY: REASON`, so an operator can fix a config without
reading a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from saia.base.durations import parse_duration

# The name a config is validated under when it did not come from a file.
NO_FILE = "<config>"


class ConfigError(Exception):
    """A config that cannot be used; str() is one line per problem."""


def _duration(value: Any) -> float:
    # The configuration reference recognises Duration fields by this function's name.
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 10m or 1h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError("expected a duration such as 30s, 10m or 1h")


Duration = Annotated[float, BeforeValidator(_duration)]


class Strict(BaseModel):
    # Field docstrings become descriptions (the generated configuration reference).
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


Model = TypeVar("Model", bound=BaseModel)


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_error(path: Path | str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {_location(item['loc'])}: {message}")
    return "\n".join(lines)


def validate(
    model: type[Model],
    data: Any,
    source: Path | str = NO_FILE,
    *,
    relative_paths: tuple[str, ...] = (),
) -> Model:
    """`data` (parsed YAML) as `model`, or ConfigError with one line per problem.

    The top-level Path fields named in `relative_paths` are resolved against the file.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping of settings")
    try:
        config = model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error)) from None
    resolved = {name: resolve_relative(getattr(config, name), source) for name in relative_paths}
    changed = {name: path for name, path in resolved.items() if path != getattr(config, name)}
    return config.model_copy(update=changed) if changed else config


def resolve_relative(path: Path, source: Path | str = NO_FILE) -> Path:
    """A relative path in a config file is relative to that file (or to the cwd)."""
    if path.is_absolute():
        return path
    base = Path(source).parent if source != NO_FILE else Path.cwd()
    return (base / path).resolve()


def read_yaml(path: Path) -> Any:
    """The parsed content of a YAML file; ConfigError on a missing or malformed file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(yaml)"
        problem = getattr(error, "problem", None) or error
        raise ConfigError(f"{path}: {where}: not valid YAML: {problem}") from None
