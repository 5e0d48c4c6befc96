"""The load generator of `atelier bench serve`: requests against one or more endpoints (pools),
closed loop (a fixed number of clients) or open loop (Poisson arrivals), with the pools
interleaved, and the figures summarised with their spread.

Why interleaved: on a shared machine the same comparison measured one side after the other gave
+19 ms in one run and -330 ms in another. Each pass (repeat) runs every level on every pool, the
pools' order alternating from pass to pass (A B, B A, A B ...), so drift in the machine's load
lands on both sides; every figure is then the median over passes with the lowest and highest
pass, and a ratio between pools comes with a bootstrap interval over the paired passes.

httpx (asyncio) and not locust: locust monkeypatches the standard library with gevent, which Ray's
own client code in the same process does not survive, and a closed/open loop of a few hundred
requests needs no framework.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from atelier.bench.results import (
    ColdStart,
    Comparison,
    Level,
    Request,
    Sample,
    Spread,
    Target,
    Workload,
)
from atelier.endpoint.api import GenerationRequest
from atelier.endpoint.client import ERRORS_BY_STATUS
from atelier.errors import InvalidInput

GENERATIONS = "/v1/images/generations"
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class Plan:
    """What to run: every level on every target, `repeats` times, interleaved."""

    targets: Sequence[Target]
    workload: Workload
    mode: str = "closed"  # closed: `level` clients; open: Poisson arrivals at `level` per second
    levels: Sequence[float] = (1, 4)
    requests_per_level: int | None = 16
    duration_s: float | None = None
    repeats: int = 3
    warmup: int = 2
    timeout_s: float = 300.0
    api_key: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.targets:
            raise InvalidInput("nothing to measure: give at least one target", where="--target")
        if len({t.pool for t in self.targets}) != len(self.targets):
            raise InvalidInput("two targets have the same pool name", where="--target")
        if self.mode not in ("closed", "open"):
            raise InvalidInput(f"mode {self.mode!r}: closed or open", where="--mode")
        if (self.requests_per_level is None) == (self.duration_s is None):
            raise InvalidInput("give a request count or a duration per level, not both",
                               where="--requests/--duration")
        if not self.levels or any(lv <= 0 for lv in self.levels):
            raise InvalidInput("levels must be positive", where="--levels")
        if self.mode == "closed" and any(lv != int(lv) for lv in self.levels):
            raise InvalidInput("closed-loop levels are client counts: whole numbers", where="--levels")
        if self.repeats < 1 or self.warmup < 0:
            raise InvalidInput("repeats must be at least 1 and warm-up at least 0",
                               where="--repeats/--warmup")

    def order(self, repeat: int) -> list[Target]:
        """The pools of pass `repeat`: A B, then B A, then A B ..."""
        targets = list(self.targets)
        return targets if repeat % 2 == 0 else targets[::-1]

    def total_requests(self) -> int | None:
        if self.requests_per_level is None:
            return None
        per_target = self.warmup + len(self.levels) * self.repeats * self.requests_per_level
        return per_target * len(self.targets)


@dataclass
class Outcome:
    requests: list[Request] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    cold_starts: list[ColdStart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# Replica count by state of a target's model deployment, or None where it cannot be read (no Ray
# dashboard reachable for it). Called from a worker thread.
ReplicaReader = Callable[[Target], dict[str, int] | None]


class _Runner:
    def __init__(self, plan: Plan, client, replicas: ReplicaReader | None,
                 on_request: Callable[[Request], None] | None):
        self.plan, self.client, self.replicas = plan, client, replicas
        self.on_request = on_request
        self.t0 = time.monotonic()
        self.ongoing: dict[str, int] = defaultdict(int)
        self.refusals: dict[str, str] = {}  # pool -> what its last failed request was told
        self.prompt_turn = 0
        self.rng = random.Random(plan.seed)
        self.out = Outcome()

    def body(self, target: Target) -> dict:
        w = self.plan.workload
        prompt = w.prompts[self.prompt_turn % len(w.prompts)]
        self.prompt_turn += 1
        request = GenerationRequest.model_validate({k: v for k, v in dict(
            prompt=prompt, model=target.model, n=w.n, width=w.width, height=w.height, steps=w.steps,
            scheduler=w.scheduler, guidance_scale=w.guidance_scale,
            response_format="png" if w.n == 1 else "b64_json").items() if v is not None})
        return request.model_dump(mode="json", exclude_none=True)

    async def one(self, target: Target, level: float, repeat: int, record: bool = True) -> Request:
        import httpx

        body = self.body(target)
        headers = {"Authorization": f"Bearer {self.plan.api_key}"} if self.plan.api_key else {}
        self.ongoing[target.pool] += 1
        sent = time.monotonic()
        status, size, images, gpu, batch = 0, 0, 0, None, None
        try:
            answer = await self.client.post(target.url.rstrip("/") + GENERATIONS, json=body,
                                            headers=headers, timeout=self.plan.timeout_s)
            status, size = answer.status_code, len(answer.content)
            gpu = answer.headers.get("X-Atelier-GPU")
            batch_text = answer.headers.get("X-Atelier-Batch-Images")
            batch = int(batch_text) if batch_text and batch_text.isdigit() else None
            if status == 200:
                images = 1 if body.get("response_format") == "png" else _count_images(answer.content)
            else:
                self.refusals[target.pool] = _message(answer)
        except httpx.HTTPError as e:
            # No answer: recorded as status 0, counted as an error.
            self.refusals[target.pool] = f"no answer ({type(e).__name__}: {e})"
        finally:
            self.ongoing[target.pool] -= 1
        request = Request(pool=target.pool, level=level, repeat=repeat, start_s=sent - self.t0,
                          latency_s=time.monotonic() - sent, status=status, bytes=size,
                          images=images, gpu=gpu, batch_images=batch)
        if record:
            self.out.requests.append(request)
        if self.on_request:
            self.on_request(request)
        return request

    async def closed(self, target: Target, clients: int, repeat: int) -> None:
        plan = self.plan
        left = [plan.requests_per_level]  # shared by the clients: the level's requests in all
        deadline = None if plan.duration_s is None else time.monotonic() + plan.duration_s

        async def client() -> None:
            while True:
                if left[0] is not None:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                elif deadline is not None and time.monotonic() >= deadline:
                    return
                await self.one(target, clients, repeat)

        await asyncio.gather(*(client() for _ in range(int(clients))))

    async def open(self, target: Target, rate: float, repeat: int) -> None:
        plan = self.plan
        tasks: list[asyncio.Task] = []
        start = time.monotonic()
        while True:
            if plan.requests_per_level is not None and len(tasks) >= plan.requests_per_level:
                break
            if plan.duration_s is not None and time.monotonic() - start >= plan.duration_s:
                break
            tasks.append(asyncio.create_task(self.one(target, rate, repeat)))
            await asyncio.sleep(self.rng.expovariate(rate))
        await asyncio.gather(*tasks)

    async def sample(self, every_s: float) -> None:
        """Replica counts (from Serve) and requests in flight (counted here), every `every_s`."""
        while True:
            for target in self.plan.targets:
                counts = await asyncio.to_thread(self.replicas, target) if self.replicas else None
                self.out.samples.append(Sample(
                    t_s=time.monotonic() - self.t0, pool=target.pool, replicas=counts or {},
                    ongoing=self.ongoing[target.pool]))
            await asyncio.sleep(every_s)

    async def cold_start(self, target: Target) -> None:
        counts = await asyncio.to_thread(self.replicas, target) if self.replicas else None
        if counts is None:
            self.out.notes.append(f"{target.pool}: cold start not measured (its replicas cannot "
                                  "be read: no Ray dashboard for it)")
            return
        if sum(counts.values()):
            self.out.notes.append(f"{target.pool}: cold start not measured (it had "
                                  f"{sum(counts.values())} replicas; deploy it with "
                                  "initial_replicas 0 and min_replicas 0 to measure one)")
            return
        first = await self.one(target, 0, -1, record=False)
        self.refused(first)
        self.out.cold_starts.append(ColdStart(pool=target.pool, seconds=first.latency_s,
                                              status=first.status))

    def refused(self, request: Request) -> None:
        """Stop before measuring a pool that refuses the requests themselves (wrong key, model
        or size): a run of 401s measures nothing. Overload (429, 503) and no answer are kept:
        they are what a load test is for."""
        if 400 <= request.status < 500 and request.status != 429:
            error = ERRORS_BY_STATUS.get(request.status, InvalidInput)
            url = next(t.url for t in self.plan.targets if t.pool == request.pool)
            raise error(f"{request.pool} answered {request.status}: "
                        f"{self.refusals.get(request.pool, '')}", where=url)

    async def run(self, cold_start: bool, sample_every_s: float) -> Outcome:
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(limits=limits) as self.client:
            sampler = asyncio.create_task(self.sample(sample_every_s))
            try:
                for target in self.plan.targets:
                    if cold_start:
                        await self.cold_start(target)
                    for _ in range(self.plan.warmup):
                        self.refused(await self.one(target, 0, -1, record=False))
                for repeat in range(self.plan.repeats):
                    for level in self.plan.levels:
                        for target in self.plan.order(repeat):
                            if self.plan.mode == "closed":
                                await self.closed(target, int(level), repeat)
                            else:
                                await self.open(target, level, repeat)
            finally:
                sampler.cancel()
        return self.out


def _message(answer) -> str:
    """The error message of an Atelier error body, else the start of the text."""
    try:
        return str(answer.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return answer.text.strip()[:300] or answer.reason_phrase


def _count_images(content: bytes) -> int:
    try:
        return len(json.loads(content)["data"])
    except (ValueError, KeyError, TypeError):
        return 0


def run(plan: Plan, *, replicas: ReplicaReader | None = None, cold_start: bool = False,
        sample_every_s: float = 1.0, on_request: Callable[[Request], None] | None = None) -> Outcome:
    """Run `plan`; every request is recorded (warm-up and cold start apart)."""
    return asyncio.run(_Runner(plan, None, replicas, on_request).run(cold_start, sample_every_s))


# -- summaries --------------------------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def per_pass(requests: Sequence[Request]) -> dict[tuple[str, float], dict[int, dict[str, float]]]:
    """(pool, level) -> repeat -> that pass's images/s and latency percentiles (answered requests).

    images/s is over the pass's window: first request sent to last answer received."""
    grouped: dict[tuple[str, float], dict[int, list[Request]]] = defaultdict(lambda: defaultdict(list))
    for r in requests:
        grouped[(r.pool, r.level)][r.repeat].append(r)
    out: dict[tuple[str, float], dict[int, dict[str, float]]] = {}
    for key, passes in grouped.items():
        out[key] = {}
        for repeat, rs in passes.items():
            ok = [r for r in rs if r.status == 200]
            window = max(r.start_s + r.latency_s for r in rs) - min(r.start_s for r in rs)
            figures = {"images_per_s": sum(r.images for r in ok) / window if window > 0 else 0.0}
            if ok:
                latencies = [r.latency_s for r in ok]
                figures |= {"p50_s": _percentile(latencies, 50), "p95_s": _percentile(latencies, 95),
                            "p99_s": _percentile(latencies, 99)}
            out[key][repeat] = figures
    return out


def summarise(requests: Sequence[Request]) -> list[Level]:
    """One Level per pool and load level: each figure's median over passes, with its range."""
    passes = per_pass(requests)
    levels = []
    for (pool, level), by_repeat in sorted(passes.items()):
        rs = [r for r in requests if r.pool == pool and r.level == level]
        answered = [f for f in by_repeat.values() if "p50_s" in f]
        # Nothing answered at a level: its latencies are not defined (None), its error rate is.
        latency = {k: Spread.of([f[k] for f in answered]) if answered else None
                   for k in ("p50_s", "p95_s", "p99_s")}
        levels.append(Level(
            pool=pool, level=level, requests=len(rs), ok=sum(r.status == 200 for r in rs),
            error_rate=sum(r.status != 200 for r in rs) / len(rs),
            rate_503=sum(r.status == 503 for r in rs) / len(rs),
            images_per_s=Spread.of([f["images_per_s"] for f in by_repeat.values()]), **latency))
    return levels


def compare(requests: Sequence[Request], a: str, b: str, seed: int = 0) -> list[Comparison]:
    """a over b for images/s, p50 and p95 at every level both ran, each with a 95 % bootstrap
    interval over the passes (paired: pass i of a ran next to pass i of b). Needs two passes."""
    passes = per_pass(requests)
    rng = np.random.default_rng(seed)
    out = []
    for level in sorted({lv for (pool, lv) in passes if pool == a}):
        pa, pb = passes.get((a, level)), passes.get((b, level))
        if not pa or not pb:
            continue
        for metric in ("images_per_s", "p50_s", "p95_s"):
            paired = [(pa[i][metric], pb[i][metric]) for i in sorted(set(pa) & set(pb))
                      if metric in pa[i] and metric in pb[i]]
            if len(paired) < 2 or any(y <= 0 for _, y in paired):
                continue
            xs, ys = np.array([p[0] for p in paired]), np.array([p[1] for p in paired])
            picks = rng.integers(0, len(paired), size=(BOOTSTRAP_RESAMPLES, len(paired)))
            ratios = np.median(xs[picks], axis=1) / np.median(ys[picks], axis=1)
            out.append(Comparison(metric=metric, level=level, a=a, b=b,
                                  ratio=float(np.median(xs) / np.median(ys)),
                                  low=float(np.percentile(ratios, 2.5)),
                                  high=float(np.percentile(ratios, 97.5))))
    return out

