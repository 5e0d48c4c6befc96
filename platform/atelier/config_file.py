"""Reading a pydantic model from a YAML file or a dict, with one kind of error for every problem.

Every configuration file (concepts, training config, serve config) goes through here, so a
missing file, bad YAML, a non-mapping or an invalid field is always one InvalidInput or NotFound
naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from atelier.errors import InvalidInput, NotFound, describe_validation_error

M = TypeVar("M", bound=BaseModel)


def read_mapping(path: str | Path, what: str, expected: str = "a mapping of field: value") -> dict:
    """The YAML mapping in `path` ({} for an empty file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise NotFound(f"{what} not found", where=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"cannot read the {what}: {e}", where=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise InvalidInput(f"not valid YAML{at}: {problem}", where=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInput(f"expected {expected}", where=str(path))
    return data


def validate(model: type[M], data: Any, where: str | None = None) -> M:
    """`model.model_validate(data)`, with a validation error turned into one InvalidInput."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InvalidInput(describe_validation_error(e), where=where) from None


def load(model: type[M], path: str | Path | None, what: str, **overrides: Any) -> M:
    """Read `path` (None: the model's defaults); top-level `overrides` that are not None win,
    as flags given on the command line win over a config file."""
    data = read_mapping(path, what) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validate(model, data, where=str(path) if path is not None else None)
