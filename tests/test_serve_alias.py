"""How the ingress serves an alias ("name@prod") while it moves: the old version answers until
a model replica has loaded the new one, a load that fails keeps the old one serving, and a new
version is loaded once, however many requests arrive meanwhile. The ingress's own methods, with
the registry lookup and the model deployment's handle replaced (the whole path runs for real in
tests/integration/test_serve.py)."""

from __future__ import annotations

import asyncio
from types import MethodType, SimpleNamespace

from atelier_serve.ingress import APIIngress

Ingress = APIIngress.func_or_class  # the class under Serve's deployment decorator


class Model:
    """The model deployment's handle: `warm` loads until the test releases it."""

    def __init__(self):
        self.released, self.fail, self.warmed = asyncio.Event(), False, []

    def options(self, multiplexed_model_id: str):
        async def remote():
            self.warmed.append(multiplexed_model_id)
            await self.released.wait()
            if self.fail:
                raise RuntimeError("the replica could not load it")
            return multiplexed_model_id

        return SimpleNamespace(warm=SimpleNamespace(remote=remote))


def ingress(registry: dict[str, str]):
    async def lookup(ref: str) -> str:
        return registry[ref]

    state = SimpleNamespace(aliases={}, _tasks=set(), model=Model(), _lookup=lookup,
                            config=SimpleNamespace(ingress=SimpleNamespace(registry_cache_s=0)))
    state._resolve_alias = MethodType(Ingress._resolve_alias, state)
    state._switch = MethodType(Ingress._switch, state)
    return state


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def promoted():
    """An ingress that has served promo@prod as version 1, and the registry where the alias has
    just moved to version 2."""
    registry = {"promo@prod": "promo:1"}
    served = ingress(registry)
    assert await served._resolve_alias("promo@prod") == "promo:1"
    registry["promo@prod"] = "promo:2"
    return registry, served


def test_the_old_version_serves_until_the_new_one_is_loaded():
    async def scenario():
        _, served = await promoted()
        for _ in range(3):  # requests while it loads: the old version, one load only
            assert await served._resolve_alias("promo@prod") == "promo:1"
            await settle()
        assert served.model.warmed == ["promo:2"]
        served.model.released.set()
        await settle()
        assert await served._resolve_alias("promo@prod") == "promo:2"
        assert served.model.warmed == ["promo:2"] and not served._tasks

    asyncio.run(scenario())


def test_a_load_that_fails_keeps_the_old_version_and_is_tried_again():
    async def scenario():
        _, served = await promoted()
        served.model.fail = True
        served.model.released.set()
        assert await served._resolve_alias("promo@prod") == "promo:1"
        await settle()
        assert await served._resolve_alias("promo@prod") == "promo:1"  # failed: still v1 ...
        await settle()
        served.model.fail = False  # ... and the next lookup tries again
        assert await served._resolve_alias("promo@prod") == "promo:1"
        await settle()
        assert await served._resolve_alias("promo@prod") == "promo:2"
        assert served.model.warmed == ["promo:2"] * 3  # failed twice, loaded the third time

    asyncio.run(scenario())


def test_a_rollback_during_a_load_never_lands_on_the_abandoned_version():
    async def scenario():
        registry, served = await promoted()
        await served._resolve_alias("promo@prod")  # v2 starts loading
        await settle()
        registry["promo@prod"] = "promo:1"  # rolled back before v2 finished loading
        assert await served._resolve_alias("promo@prod") == "promo:1"
        served.model.released.set()
        await settle()
        assert await served._resolve_alias("promo@prod") == "promo:1"

    asyncio.run(scenario())
