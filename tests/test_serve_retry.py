"""The ingress retries a generation whose model replica went away, and nothing else: a model's
error and a full queue are answered at once, and a replica that does not come back in the
bounded time is a 503 (Overloaded), never a 500. The ingress's own method, with the model
deployment's handle replaced (killing a real replica under load is tests/integration/test_faults.py)."""

from __future__ import annotations

import asyncio
import time
from types import MethodType, SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from atelier.endpoint.config import Ingress as IngressConfig
from atelier.errors import InvalidInput, Overloaded
from atelier_serve.ingress import APIIngress

Ingress = APIIngress.func_or_class  # the class under Serve's deployment decorator
IMAGES = {"images": ["png"], "seed": 7}


class Handle:
    """The model deployment's handle: each call takes the next outcome (an exception is raised)."""

    def __init__(self, *outcomes):
        self.outcomes, self.requests = list(outcomes), []

    async def remote(self, request):
        self.requests.append(dict(request))
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    @property
    def generate(self):
        return SimpleNamespace(remote=self.remote)


def ingress(**config):
    retried: list[str] = []
    state = SimpleNamespace(config=SimpleNamespace(ingress=IngressConfig(**config)),
                            metrics=SimpleNamespace(retried=retried.append))
    state._generate = MethodType(Ingress._generate, state)
    return state, retried


def run(state, handle):
    return asyncio.run(state._generate(handle, {"prompt": "p", "seed": 7}, "shop:1"))


@pytest.mark.parametrize("gone", [ActorDiedError(), ActorUnavailableError("restarting", None),
                                  ReplicaUnavailableError("r1")], ids=type)
def test_a_generation_whose_replica_went_away_is_sent_again_with_the_same_seed(gone):
    state, retried = ingress()
    handle = Handle(gone, gone, IMAGES)
    assert run(state, handle) == IMAGES
    assert handle.requests == [{"prompt": "p", "seed": 7}] * 3  # the same images, whichever answers
    assert retried == ["shop:1", "shop:1"]


@pytest.mark.parametrize("error", [RayTaskError("generate", "tb", InvalidInput("bad")),
                                   BackPressureError(num_queued_requests=9, max_queued_requests=8)],
                         ids=["model error", "queue full"])
def test_a_models_error_or_a_full_queue_is_never_retried(error):
    state, retried = ingress()
    handle = Handle(error, IMAGES)
    with pytest.raises(type(error)):
        run(state, handle)
    assert len(handle.requests) == 1 and retried == []


def test_retries_are_bounded_in_number_and_end_in_a_503():
    state, _ = ingress(replica_retries=2, replica_retry_s=60)
    handle = Handle(ActorDiedError())
    with pytest.raises(Overloaded, match="3 attempts in") as raised:
        run(state, handle)
    assert len(handle.requests) == 3 and raised.value.http_status == 503


def test_retries_are_bounded_in_time():
    state, _ = ingress(replica_retries=20, replica_retry_s=1.0)
    handle = Handle(ActorDiedError())
    start = time.monotonic()
    with pytest.raises(Overloaded):
        run(state, handle)
    # Backing off 0.25 s, 0.5 s, 1 s: the budget ends it after a few attempts, not twenty.
    assert time.monotonic() - start < 5 and len(handle.requests) < 6
