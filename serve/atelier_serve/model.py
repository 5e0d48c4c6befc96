"""The model deployment: Stable Diffusion pipelines multiplexed by model id, requests batched."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

from atelier.endpoint.config import Replica
from atelier.errors import AtelierError, ModelNotReady, first_line
from atelier_serve.metrics import ModelMetrics
from atelier_serve.pipelines import Job, Loaded, ModelCache, placement, scheduler_name

log = logging.getLogger("ray.serve")
# Serve's multiplexing bounds models by count only and offers no public way to evict one; the
# memory budget evicts through its private per-function LRU (Serve 2.60 keeps it under this
# attribute, created on the first call). If Serve changes that, replicas with a budget refuse to
# start (`check_multiplex_lru`) rather than run without one.
_MULTIPLEX_WRAPPER = "__serve_multiplex_wrapper"


def check_multiplex_lru() -> None:
    """Fail at replica start when Serve no longer has the LRU the memory budget evicts through."""
    from ray.serve import multiplex

    wrapper = getattr(multiplex, "_ModelMultiplexWrapper", None)
    if wrapper is None or not callable(getattr(wrapper, "unload_model_lru", None)):
        raise RuntimeError(
            "replica.memory_budget_gb needs Ray Serve's multiplexing LRU "
            "(ray.serve.multiplex._ModelMultiplexWrapper.unload_model_lru), which this Ray "
            "version does not have: unset the budget (max_models still bounds the count)")


def multiplex_lru(load_model):
    """The LRU Serve made for `load_model` on its first call; loudly, if Serve renamed it."""
    try:
        return getattr(load_model, _MULTIPLEX_WRAPPER)
    except AttributeError:
        raise RuntimeError(f"Ray Serve no longer keeps its multiplexing LRU at "
                           f"{_MULTIPLEX_WRAPPER}: the memory budget cannot evict") from None


def _images(jobs: list[Job]) -> int:
    # A batch is bounded in images, not requests: n = 4 fills a batch of 4 on its own.
    return sum(job.n for job in jobs)


@serve.deployment(name="StableDiffusion")
class StableDiffusion:
    """One replica: the models it has loaded, and a batch queue in front of them."""

    async def __init__(self, args: dict[str, Any]):  # type: ignore[misc]  # Serve awaits it
        import torch

        from atelier.models.libraries import quiet_libraries
        from atelier.settings import get_settings

        quiet_libraries()
        self.gpu: str = args["gpu"]
        self.replica = Replica.model_validate(args["replica"])
        if self.replica.memory_budget_gb:
            check_multiplex_lru()
        torch.set_num_threads(self.replica.torch_threads or max(1, int(args["num_cpus"])))
        device, dtype = placement(args["num_gpus"], args["dtype"])
        self.cache = ModelCache(get_settings(), base_models=args["base_models"], device=device,
                                dtype=dtype)
        self.metrics = ModelMetrics(self.gpu)
        self._batch.set_max_batch_size(self.replica.max_batch_images)  # type: ignore[attr-defined]  # @serve.batch adds it
        self._ongoing = 0
        self._last_batch = 1
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

        async def load_model(model_id: str) -> Loaded:
            return await self._load(model_id)

        # Wrapped here rather than on the class: the LRU bound comes from the config.
        self._load_model = load_model
        self._get_model = serve.multiplexed(max_num_models_per_replica=self.replica.max_models)(load_model)
        for ref in args.get("preload", []):
            try:
                await self._get_model(await asyncio.to_thread(self.cache.model_id, ref))
            except AtelierError as e:  # a replica that cannot preload still serves the others
                log.warning("preloading %s failed: %s", ref, e)

    # -- models ----------------------------------------------------------------------------------
    async def _load(self, model_id: str) -> Loaded:
        started = time.perf_counter()
        if self.replica.memory_budget_gb:
            await self._make_room(await asyncio.to_thread(self.cache.estimate, model_id))
        loaded = await asyncio.to_thread(self.cache.load, model_id)
        if self.replica.memory_budget_gb:
            await self._make_room(0)  # measured, now that it is in memory
        self.metrics.load.observe(time.perf_counter() - started, tags=self.metrics.tags(model_id))
        self.metrics.weights.set(self.cache.bytes_loaded(), tags={"gpu": self.gpu})
        log.info("loaded %s in %.2f s (%.1f MB of weights on this replica)", model_id,
                 time.perf_counter() - started, self.cache.bytes_loaded() / 1e6)
        return loaded

    async def _make_room(self, extra: int) -> None:
        """Unload least recently used models until the weights fit the memory budget.

        Serve's multiplexing bounds the number of models, not their bytes; its LRU is the only
        one that keeps request routing right, so eviction goes through it. Best effort: a model
        still running a request is freed when that request ends.
        """
        limit = (self.replica.memory_budget_gb or 0) * 1e9  # only called with a budget
        lru = multiplex_lru(self._load_model)  # exists: this runs inside its first load
        while lru.models and self.cache.bytes_loaded() + extra > limit:
            await lru.unload_model_lru()

    async def _acquire(self, model_id: str) -> Loaded:
        for _ in range(3):
            loaded = await self._get_model(model_id)
            if loaded.acquire():
                return loaded
        raise ModelNotReady(f"model {model_id!r} was unloaded as it was picked; retry",
                            where=model_id)

    async def warm(self) -> str:
        """Load the call's multiplexed model (if this replica has not): the ingress calls it before
        it moves an alias to a new version, so no request waits on the load or meets a
        half-loaded model."""
        model_id = serve.get_multiplexed_model_id()
        await self._get_model(model_id)
        return model_id

    # -- requests --------------------------------------------------------------------------------
    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Images for one validated request (the ingress's); the model comes from the request's
        multiplexed model id."""
        model_id = serve.get_multiplexed_model_id()
        started = time.perf_counter()
        tags = self.metrics.tags(model_id)
        self._ongoing += 1
        try:
            loaded = await self._acquire(model_id)
            try:
                job = self._job(loaded, request)
                # Serve forms the next batch as soon as its first request arrives, even while the
                # pipeline is busy: requests arriving during a batch would split into a lone one
                # and the rest. Held back until the pipeline is free, they go in together.
                await self._idle.wait()
                # Waiting for a batch to fill pays only when requests arrive together: a replica
                # serving one client at a time would add the whole wait to every image.
                together = self._ongoing > 1 or self._last_batch > 1
                self._batch.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
                    self.replica.batch_wait_timeout_s if together else 0.0)
                result = await self._batch(job)
            finally:
                await asyncio.to_thread(loaded.done)
            if isinstance(result, Exception):
                raise result
            images, batch_images = result
        except Exception:
            self.metrics.failures.inc(tags=tags)
            raise
        finally:
            self._ongoing -= 1
        self.metrics.latency.observe(time.perf_counter() - started, tags=tags)
        self.metrics.images.inc(len(images), tags=tags)
        return {
            "images": images,
            "seeds": [job.seed + i for i in range(job.n)],
            "width": job.width,
            "height": job.height,
            "steps": job.steps,
            "guidance_scale": job.guidance_scale,
            "scheduler": job.scheduler,
            # What served it, for clients that compare pools and for tests of batching: the GPU
            # type of this replica, and the images its pipeline call made (this request's and
            # those batched with it).
            "gpu": self.gpu,
            "batch_images": batch_images,
        }

    def _job(self, loaded: Loaded, request: dict[str, Any]) -> Job:
        native_width, native_height = loaded.base.native_size
        return Job(
            loaded=loaded,
            prompt=request["prompt"],
            negative_prompt=request.get("negative_prompt"),
            n=request["n"],
            seed=request["seed"],
            steps=request["steps"],
            guidance_scale=request["guidance_scale"],
            width=request.get("width") or native_width,
            height=request.get("height") or native_height,
            scheduler=request.get("scheduler") or scheduler_name(loaded.base),
        )

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.0, batch_size_fn=_images)
    async def _batch(self, jobs: list[Job]) -> list[tuple[list[bytes], int] | Exception]:
        # Serve already split the batch by model id; within a model, requests of one size,
        # step count, scheduler and guidance share a pipeline call.
        self._last_batch = len(jobs)
        self._running += 1
        self._idle.clear()
        try:
            return await self._run_groups(jobs)
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def _run_groups(self, jobs: list[Job]) -> list[tuple[list[bytes], int] | Exception]:
        """Per job: its images and the number of images in the pipeline call that made them."""
        groups: dict[tuple, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(index)
        results: list[Any] = [None] * len(jobs)
        for indices in groups.values():
            group = [jobs[i] for i in indices]
            size = _images(group)
            self.metrics.batch_images.observe(size, tags={"gpu": self.gpu})
            try:
                outputs: list[Any] = [(pngs, size) for pngs in await asyncio.to_thread(self.cache.run, group)]
            except Exception as e:  # one failing group does not fail the others
                log.exception("generation failed")
                error = e if isinstance(e, AtelierError) else AtelierError(
                    f"generation failed: {first_line(e)}")
                outputs = [error] * len(group)
            for index, output in zip(indices, outputs, strict=True):
                results[index] = output
        return results

    # -- introspection ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """What this replica holds: for tests and debugging, not on the HTTP API."""
        lru = getattr(self._load_model, _MULTIPLEX_WRAPPER, None)
        return {
            "models": list(lru.models) if lru is not None else [],
            "bases": sorted(self.cache.bases),
            "bytes_loaded": self.cache.bytes_loaded(),
            "batch_wait_timeout_s": self._batch.get_batch_wait_timeout_s(),  # type: ignore[attr-defined]
        }
