"""The one polling loop: returns what the check found, gives up on time with the last reason."""

from __future__ import annotations

import time

import pytest

from atelier.errors import ServiceError
from atelier.waiting import NotYet, poll, wait_until


def counter(ready_at: int, value="ready"):
    calls = []

    def check():
        calls.append(time.monotonic())
        return value if len(calls) >= ready_at else None

    return check, calls


def test_wait_until_returns_what_the_check_found_once_it_is_true():
    check, calls = counter(3, value={"status": "RUNNING"})
    assert wait_until(check, timeout_s=5, interval_s=0.01, what="it") == {"status": "RUNNING"}
    assert len(calls) == 3


def test_a_falsy_result_means_not_yet():
    results = iter([False, 0, "", True])
    assert wait_until(lambda: next(results), timeout_s=5, interval_s=0.01, what="it") is True


def test_wait_until_waits_the_interval_between_checks():
    check, calls = counter(4)
    wait_until(check, timeout_s=5, interval_s=0.05, what="it")
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert min(gaps) >= 0.04


def test_timeout_is_a_service_error_naming_what_and_the_last_reason():
    reasons = iter(["starting", "still starting", "almost"])

    def check():
        raise NotYet(next(reasons, "almost"))

    t0 = time.monotonic()
    with pytest.raises(ServiceError) as raised:
        wait_until(check, timeout_s=0.3, interval_s=0.05, what="the thing", where="here")
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 1.0
    assert str(raised.value) == "here: gave up waiting for the thing after 0.3 s (almost)"


def test_errors_in_retry_on_are_retried_and_reported_others_end_the_wait_at_once():
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("refused")
        return True

    assert wait_until(flaky, timeout_s=5, interval_s=0.01, what="x", retry_on=(ConnectionError,))
    assert len(attempts) == 3

    def refused():
        raise ConnectionError("refused")

    with pytest.raises(ServiceError, match=r"after 0.1 s \(refused\)$"):
        wait_until(refused, timeout_s=0.1, interval_s=0.01, what="x", retry_on=(ConnectionError,))

    broken = []

    def crash():
        broken.append(1)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        wait_until(crash, timeout_s=5, interval_s=0.01, what="x", retry_on=(ConnectionError,))
    assert len(broken) == 1


def test_the_check_runs_at_least_once_even_without_time():
    check, calls = counter(1)
    assert wait_until(check, timeout_s=0, what="x") == "ready"
    assert len(calls) == 1


def test_poll_gives_up_quietly_with_the_reason():
    def never():
        raise NotYet("not today")

    assert poll(never, timeout_s=0.1, interval_s=0.02) == (None, "not today")
    check, _ = counter(2)
    assert poll(check, timeout_s=5, interval_s=0.01) == ("ready", None)
