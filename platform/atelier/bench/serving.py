"""`atelier bench serve` around the load generator: the Serve side of a measurement (replica
counts read from Serve, the local stand-in pools) and the result file.

Two local Serve applications stand in for two pools, so that `atelier bench serve` and
`atelier report` run end to end on one machine (and in CI) without a GPU.

They differ in one setting a real pool choice also moves, the batch size (one image per pipeline
call against eight), and in nothing else: same model, same CPUs, same threads. They are always
marked `stand_in` and named "cpu-...", so that no report shows them as a T4 or an A100; each is
priced as the catalogue pool the user names (`prices_as`), only to exercise the cost table.

They are deployed next to whatever Serve already runs (Serve's REST API takes the whole set of
applications at once, so the running ones are sent again unchanged) and removed afterwards,
leaving the cluster's applications as they were.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from atelier.bench import load
from atelier.bench.load import Plan, ReplicaReader
from atelier.bench.results import Environment, Request, ServeResult, Target
from atelier.endpoint.config import ServeConfig
from atelier.endpoint.deploy import ServeCluster, local_document, with_models
from atelier.errors import InvalidInput, ServiceError
from atelier.settings import Settings
from atelier.waiting import NotYet, wait_until

MODEL_DEPLOYMENT = "StableDiffusion"  # the model deployment's name in every Atelier application
BATCHES = {"cpu-b1": 1, "cpu-b8": 8}


def stand_in_config(base: ServeConfig, name: str, batch: int) -> ServeConfig:
    """`base` as one stand-in: its own name and route, `batch` images per call, one replica of
    one CPU and one thread that starts at the first request (so that a cold start is measured)."""
    cpu = ServeConfig.parse(base.model_dump() | {"gpu": "cpu"}, where="stand-in").pool
    pool = cpu.model_copy(update={
        "num_cpus": 0.5, "max_ongoing_requests": 16, "max_queued_requests": 64,
        "autoscaling": cpu.autoscaling.model_copy(update={
            "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
            "downscale_delay_s": 600, "downscale_to_zero_delay_s": 600}),
        "replica": cpu.replica.model_copy(update={"max_batch_images": batch, "torch_threads": 1}),
    })
    data = base.model_dump() | {
        "name": f"bench-{name}", "route_prefix": f"/bench-{name}", "gpu": "cpu",
        "pools": base.pools.model_copy(update={"cpu": pool}).model_dump(),
        "ingress": base.ingress.model_copy(update={"num_cpus": 0.1}).model_dump(),
        # A request's images run in one batch, so the batch-1 stand-in takes n = 1 only.
        "limits": base.limits.model_copy(update={"max_images": min(base.limits.max_images, batch)})
        .model_dump(),
    }
    return ServeConfig.parse(data, where=f"stand-in {name}")


@contextmanager
def deployed(settings: Settings, base: ServeConfig, model: str | None, prices_as: str | None,
             *, timeout_s: float = 600) -> Iterator[tuple[list[Target], ServeCluster]]:
    """The stand-ins running on the cluster `settings` names, as targets; removed on exit."""
    cluster = ServeCluster(settings)
    before = cluster.details()
    running = [app["deployed_app_config"] for app in (before.get("applications") or {}).values()
               if app.get("deployed_app_config")]
    configs = {name: with_models(settings, stand_in_config(base, name, batch),
                                 [model] if model else [])
               for name, batch in BATCHES.items()}
    taken = {app.get("route_prefix") for app in running} & {c.route_prefix for c in configs.values()}
    if taken:
        raise InvalidInput(f"Serve already routes {', '.join(sorted(str(t) for t in taken))}",
                           where="stand-ins", hint="`atelier serve down` first")
    documents = [local_document(settings, c) for c in configs.values()]
    document: dict[str, Any] = documents[0] | {
        "applications": running + [d["applications"][0] for d in documents]}
    if running:  # Serve refuses new HTTP options while it runs: keep the ones it has
        document["http_options"] = {k: v for k, v in (before.get("http_options") or {}).items()
                                    if k in ("host", "port", "request_timeout_s") and v is not None}
    cluster.deploy(document)
    try:
        for config in configs.values():
            cluster.wait_running(config.name, timeout_s=timeout_s)
        http = document["http_options"]
        host = "127.0.0.1" if http["host"] in ("0.0.0.0", "::") else http["host"]
        targets = [Target(pool=name, url=f"http://{host}:{http['port']}{config.route_prefix}",
                          model=model, stand_in=True, prices_as=prices_as,
                          description=f"CPU stand-in: one replica (1 thread), max_batch_images "
                          f"{BATCHES[name]}, model {model or config.default_model or 'tiny'}")
                   for name, config in configs.items()]
        for target in targets:
            _wait_routed(target.url, timeout_s)
        yield targets, cluster
    finally:
        if running:
            cluster.deploy(document | {"applications": running})
        else:
            cluster.delete()


def _wait_routed(url: str, timeout_s: float) -> None:
    """The proxy learns a new route a moment after Serve says the application runs."""
    import requests

    def routed() -> bool:
        answer = requests.get(f"{url}/healthz", timeout=5)
        if answer.status_code != 200:
            raise NotYet(f"answered {answer.status_code}")
        return True

    wait_until(routed, timeout_s=timeout_s, interval_s=0.2, retry_on=(requests.RequestException,),
               what=f"an answer from {url}/healthz", where=url)


def replica_reader(cluster: ServeCluster) -> ReplicaReader:
    """Replica counts of the model deployment of the application a target's URL routes to (by
    its route prefix), from the Ray dashboard `cluster` talks to; None where that cannot be read
    (no dashboard reachable, as for an endpoint on a cluster without a port-forward)."""
    def read(target: Target) -> dict[str, int] | None:
        prefix = urlparse(target.url).path.rstrip("/") or "/"
        try:
            apps = cluster.details().get("applications") or {}
        except ServiceError:
            return None
        for app in apps.values():
            if ((app.get("route_prefix") or "/").rstrip("/") or "/") == prefix:
                found = (app.get("deployments") or {}).get(MODEL_DEPLOYMENT) or {}
                return dict(Counter(r["state"] for r in found.get("replicas") or []))
        return None
    return read


def measure(plan: Plan, *, replicas: ReplicaReader | None, cold_start: bool,
            on_request: Callable[[Request], None] | None = None, command: str = "") -> ServeResult:
    """Run `plan` and make its result: the requests, their summary per pool and level, and each
    later pool compared with the first."""
    outcome = load.run(plan, replicas=replicas, cold_start=cold_start, on_request=on_request)
    first = plan.targets[0].pool
    comparisons = [c for t in plan.targets[1:] for c in load.compare(outcome.requests, t.pool, first)]
    notes = list(outcome.notes)
    if plan.repeats < 2:
        notes.append("one pass only: no figure has a spread and no ratio an interval")
    return ServeResult(
        environment=Environment.capture(), command=command, notes=notes, mode=plan.mode,
        levels=list(plan.levels), duration_s=plan.duration_s,
        requests_per_level=plan.requests_per_level, warmup=plan.warmup,
        targets=list(plan.targets), workload=plan.workload,
        levels_summary=load.summarise(outcome.requests), comparisons=comparisons,
        requests=outcome.requests, samples=outcome.samples, cold_starts=outcome.cold_starts)
