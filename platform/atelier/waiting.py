"""Waiting for something to become true: the one polling loop of the platform (services coming
up, processes going away, a Serve application running)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from atelier.errors import ServiceError

T = TypeVar("T")


class NotYet(Exception):
    """Raised by a check to say why it is not done yet; the reason ends up in the timeout error."""


def poll(check: Callable[[], T | None], *, timeout_s: float, interval_s: float = 0.1,
         retry_on: tuple[type[BaseException], ...] = ()) -> tuple[T | None, str | None]:
    """Call `check` every `interval_s` until it returns something truthy, for `timeout_s` at most
    (it runs at least once). Returns (that result, None), or on timeout (None, why): the reason
    of the last NotYet or exception in `retry_on`, None after a falsy result. Any other exception
    from `check` ends the wait at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result, None
            why = None
        except NotYet as e:
            why = str(e) or None
        except retry_on as e:
            why = str(e) or type(e).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            return None, why
        time.sleep(min(interval_s, left))


def wait_until(check: Callable[[], T | None], *, timeout_s: float, what: str, interval_s: float = 0.1,
               retry_on: tuple[type[BaseException], ...] = (), where: str | None = None,
               hint: str | None = None) -> T:
    """`poll`, but a timeout is a ServiceError: "gave up waiting for <what> after <timeout_s> s
    (<why>)". Returns what `check` returned."""
    result, why = poll(check, timeout_s=timeout_s, interval_s=interval_s, retry_on=retry_on)
    if result:
        return result
    message = f"gave up waiting for {what} after {timeout_s:g} s"
    raise ServiceError(message + (f" ({why})" if why else ""), where=where, hint=hint)
