"""The one error hierarchy: every class carries its HTTP status and CLI exit code.

The ingress maps `http_status`, the CLI maps `exit_code` and prints `str(error)` on one line;
neither needs to know the subclasses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class AtelierError(Exception):
    """Base class. `where` names the file, field or address the error is about."""

    http_status = 500
    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class InvalidInput(AtelierError):
    """The user's input (a file, a field, a flag, a request body) is wrong."""

    http_status = 422
    exit_code = 2


class NotFound(AtelierError):
    """A model, file, job or object that was named does not exist."""

    http_status = 404
    exit_code = 3


class IntegrityError(AtelierError):
    """Stored data does not match its manifest (size or sha256), or has no manifest."""

    http_status = 502
    exit_code = 4


class StorageUnavailable(AtelierError):
    """The object store cannot be reached, or refused the credentials."""

    http_status = 503
    exit_code = 5


class ServiceError(AtelierError):
    """A local service (SeaweedFS, Ray) could not be started, stopped or reached."""

    http_status = 503
    exit_code = 6


class PortInUse(ServiceError):
    """A port the platform was told to use is already taken by another process."""

    http_status = 409
    exit_code = 7


class Unauthorized(AtelierError):
    """Missing or wrong credentials for an Atelier endpoint."""

    http_status = 401
    exit_code = 8


class Overloaded(AtelierError):
    """The service is at capacity; retry later."""

    http_status = 503
    exit_code = 9


class ModelNotReady(AtelierError):
    """A model exists but could not be loaded (yet)."""

    http_status = 424
    exit_code = 10


class Conflict(AtelierError):
    """Someone else changed the thing first (an alias moved while this promotion was deciding)."""

    http_status = 409
    exit_code = 11


class GateRefused(AtelierError):
    """A promotion's gate said no: the candidate misses a condition or does not beat the
    version the alias names now."""

    http_status = 412
    exit_code = 12


def first_line(error: BaseException) -> str:
    """An exception as one short line for a user or client (no traceback, no multi-line dumps)."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def describe_validation_error(error: ValidationError | list[dict], limit: int = 5) -> str:
    """Pydantic's errors with field paths as a user writes them: 'concepts.3.identifir: unknown key'.

    Takes a ValidationError or its `errors()` list (FastAPI hands over the list)."""
    items = error if isinstance(error, list) else error.errors()
    parts = []
    for item in items[:limit]:
        loc = ".".join(str(p) for p in item["loc"])
        message = "unknown key" if item["type"] == "extra_forbidden" else str(item["msg"])
        parts.append(f"{loc}: {message.removeprefix('Value error, ')}" if loc
                     else message.removeprefix("Value error, "))
    if len(items) > limit:
        parts.append(f"and {len(items) - limit} more")
    return "; ".join(parts)
