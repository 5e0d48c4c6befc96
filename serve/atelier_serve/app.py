"""The application builder Serve imports (`atelier_serve.app:build`): ServeConfig in, app out."""

# No `from __future__ import annotations`: Serve reads the builder's annotation as a class to
# validate `args` with, and a string annotation would turn that off.
from typing import Any

from ray.serve import Application

from atelier.endpoint.config import Pool, ServeConfig
from atelier_serve.ingress import APIIngress
from atelier_serve.model import StableDiffusion


def actor_options(pool: Pool) -> dict[str, Any]:
    """Ray resources of one model replica on `pool`."""
    options: dict[str, Any] = {"num_cpus": pool.num_cpus}
    if pool.num_gpus:
        options["num_gpus"] = pool.num_gpus
    if pool.accelerator_type:
        options["accelerator_type"] = pool.accelerator_type
    if pool.memory_gb:
        options["memory"] = int(pool.memory_gb * 2**30)
    return options


def replica_args(config: ServeConfig) -> dict[str, Any]:
    """What a model replica is constructed with. Autoscaling and queue sizes stay out: Serve
    applies changes to those without restarting replicas (and reloading their models)."""
    pool = config.pool
    return {
        "gpu": config.gpu,
        "num_cpus": pool.num_cpus,
        "num_gpus": pool.num_gpus,
        "dtype": pool.dtype,
        "replica": pool.replica.model_dump(mode="json"),
        "base_models": dict(config.base_models),
        "preload": list(config.preload),
    }


def build(args: ServeConfig) -> Application:
    """The ingress bound to the model deployment, every option taken from `args`."""
    config = ServeConfig.parse(args)
    pool = config.pool
    # Rejected requests carry Retry-After whichever deployment's queue was full.
    backpressure = {"status_code": 503, "retry_after_s": config.http.retry_after_s}
    # @serve.deployment makes the classes Deployments, which a type checker cannot see.
    model = StableDiffusion.options(  # type: ignore[attr-defined]
        ray_actor_options=actor_options(pool),
        autoscaling_config=pool.autoscaling.to_serve(),
        max_ongoing_requests=pool.max_ongoing_requests,
        max_queued_requests=pool.max_queued_requests,
        backpressure_config=backpressure,
    ).bind(replica_args(config))
    return APIIngress.options(  # type: ignore[attr-defined]
        num_replicas=config.ingress.replicas,
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        max_queued_requests=config.ingress.max_queued_requests,
        backpressure_config=backpressure,
    ).bind(model, config.model_dump(mode="json"))
