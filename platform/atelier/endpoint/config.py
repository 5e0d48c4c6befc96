"""The serving configuration: one model for the Serve config file, the CLI and the application.

`ServeConfig` is what `atelier serve up --config` reads, what `atelier serve config` writes into a
RayService's serveConfigV2 (as the application's `args`), and what the application builder
validates on the cluster.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)

from atelier import config_file, pools
from atelier.errors import InvalidInput

# A pool name of the one table (atelier.pools); an unknown one gets the table's message.
GpuPool = Annotated[pools.PoolName, BeforeValidator(pools.known_name)]


def check_ref(value: str | None) -> str | None:
    """A registry reference ("name", "name:version" or "name@alias") or a configured base name; nothing that
    could point outside the registry prefix (no paths, no s3:// URIs, no hub ids)."""
    from atelier.models.ref import parse_registered

    if value is None:
        return None
    try:
        parse_registered(value)
    except InvalidInput as e:
        raise ValueError(e.message) from None
    return value


def _ref_pattern(schema: dict[str, Any]) -> None:
    """`check_ref`'s rule as one regular expression in the JSON Schema (what a client or a
    fuzzer reads); `check_ref` stays the check, as its messages name the mistake. Made when a
    schema is, so that importing the config does not import the models."""
    from atelier.models.ref import ALIAS, NAME, VERSION

    schema["pattern"] = (rf"^(?!.*\.\.){NAME.pattern[1:-1]}"
                         rf"(:{VERSION.pattern[1:-1]}|@{ALIAS.pattern[1:-1]})?$")


# A model reference as a request or a config names it.
ModelRef = Annotated[str, AfterValidator(check_ref), Field(json_schema_extra=_ref_pattern)]


class Limits(BaseModel):
    """Bounds on a request; a value outside them is a 422 that names the field."""

    model_config = ConfigDict(extra="forbid")

    max_images: int = Field(4, ge=1, le=64, description="Largest n per request.")
    max_steps: int = Field(100, ge=1, le=1000, description="Most denoising steps per request.")
    min_side: int = Field(64, ge=8, description="Smallest width or height in pixels.")
    max_width: int = Field(1024, ge=8, description="Largest width in pixels.")
    max_height: int = Field(1024, ge=8, description="Largest height in pixels.")
    max_prompt_chars: int = Field(
        1000, ge=1, description="Longest prompt (and negative prompt) in characters."
    )
    max_guidance_scale: float = Field(30.0, gt=0, description="Largest guidance_scale.")

    @model_validator(mode="after")
    def _check(self) -> Limits:
        if self.min_side > min(self.max_width, self.max_height):
            raise ValueError("min_side is larger than max_width or max_height")
        return self


class Defaults(BaseModel):
    """Values a request leaves unset."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(25, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale.")


class Autoscaling(BaseModel):
    """Ray Serve autoscaling of the model deployment (a subset of Serve's AutoscalingConfig)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(
        1, ge=0, description="Replicas kept when idle; 0 scales to zero (the first request then "
        "waits for a cold start: a replica starts and loads its model from S3)."
    )
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas at deploy time. Unset: min_replicas."
    )
    max_replicas: int = Field(2, ge=1, description="Most replicas (GPUs of the pool it may take).")
    target_ongoing_requests: float = Field(
        4, gt=0,
        description="Requests per replica (running plus queued) the autoscaler aims for. Keep it "
        "near max_batch_images: a lower target spreads requests so thin that batches stay small.",
    )
    upscale_delay_s: float = Field(
        5.0, ge=0, description="Load must stay high this long to add replicas.")
    downscale_delay_s: float = Field(
        120.0, ge=0, description="Load must stay low this long to remove replicas.")
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="Idle time before the last replica goes (min_replicas 0). Unset: "
        "downscale_delay_s."
    )
    metrics_interval_s: float | None = Field(
        None, gt=0, description="How often replicas report their load to the autoscaler. Unset: "
        "Serve's default (10 s). Deprecated by Serve 2.60 in favour of the environment variables "
        "RAY_SERVE_{REPLICA,HANDLE}_AUTOSCALING_METRIC_PUSH_INTERVAL_S, still honoured."
    )
    look_back_period_s: float | None = Field(
        None, gt=0, description="Window the autoscaler averages the load over; longer than "
        "metrics_interval_s. Unset: Serve's default (30 s)."
    )

    @model_validator(mode="after")
    def _check(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is larger than max_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def to_serve(self) -> dict[str, Any]:
        """Serve's `autoscaling_config` dict."""
        return self.model_dump(exclude_none=True)


class Replica(BaseModel):
    """What one model replica does with its device: batching, models kept, threads."""

    model_config = ConfigDict(extra="forbid")

    max_batch_images: int = Field(
        4, ge=1, description="Most images in one pipeline call (a request's n counts in full)."
    )
    batch_wait_timeout_s: float = Field(
        0.1, ge=0,
        description="How long a batch waits for more requests once traffic is concurrent (it "
        "starts at once when full). A replica whose last batch held a single request does not "
        "wait, so one client pays none of it. Measured on CPU: 0.05 s sometimes let clients' "
        "replies and new requests drift apart into small batches; 0.1 s kept them together.",
    )
    max_models: int = Field(
        4, ge=1, description="Models (full pipelines and adapters) a replica keeps loaded; the "
        "least recently used one is unloaded first."
    )
    memory_budget_gb: float | None = Field(
        None, gt=0, description="Weights a replica keeps loaded (measured from their tensors); "
        "least recently used models are unloaded to stay under it. Unset: only max_models bounds."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per replica. Unset: the replica's CPUs (at least 1)."
    )


class Pool(BaseModel):
    """One kind of machine the model deployment can run on, and how it scales there."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per model replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (0 on the cpu pool).")
    accelerator_type: str | None = Field(
        None, description='Ray accelerator type the replica needs ("T4", "A100"); Ray detects it '
        "on the node. Unset: any. On a GPU pool it is the pool's or unset."
    )
    memory_gb: float | None = Field(
        None, gt=0, description="Host memory reserved per replica (Ray scheduling, not a limit)."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights' dtype: auto is float16 on GPU, float32 on CPU. A half dtype "
        "must be one the pool computes in (the T4 has no bfloat16)."
    )
    max_ongoing_requests: int = Field(
        8, ge=1, description="Requests one replica holds at once (running and waiting for a batch); "
        "at least max_batch_images, else batches cannot fill."
    )
    max_queued_requests: int = Field(
        16, ge=-1, description="Requests waiting for a replica, per caller, before new ones get 503 "
        "with Retry-After (-1: unbounded, which lets a burst queue without limit). Serve counts a "
        "request as queued until a replica accepts it, so a burst is refused a little before the "
        "queue is truly full: leave headroom over the concurrency you expect."
    )
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Replica counts.")
    replica: Replica = Field(default_factory=Replica, description="Per-replica behaviour.")


def _pool_defaults() -> dict[str, Pool]:
    """Serving defaults of each pool of the table: its GPUs and accelerator from the table, the
    replica's reservations, scaling and batching tuned here."""
    # Sized for SD 1.5 at 512 px: a T4 (16 GB) runs batches of 4 in fp16, an A100 batches of 8;
    # the weight budgets leave the rest of the GPU memory to activations.
    tuned: dict[str, dict[str, Any]] = {
        "t4": dict(num_cpus=4, memory_gb=16, max_ongoing_requests=8, max_queued_requests=32,
                   autoscaling=Autoscaling(min_replicas=1, max_replicas=4, target_ongoing_requests=4),
                   replica=Replica(max_batch_images=4, max_models=6, memory_budget_gb=8)),
        "a100": dict(num_cpus=8, memory_gb=48, max_ongoing_requests=16, max_queued_requests=64,
                     autoscaling=Autoscaling(min_replicas=1, max_replicas=2, target_ongoing_requests=8),
                     replica=Replica(max_batch_images=8, max_models=12, memory_budget_gb=24)),
    }
    return {name: Pool(num_gpus=node.gpus, accelerator_type=node.ray_accelerator_type,
                       **tuned.get(name, {}))
            for name, node in pools.POOLS.items()}


def _pool_default(name: str) -> Pool:
    return _pool_defaults()[name]


def _merged(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for key, value in given.items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_dicts else value
    return out


class _PoolsBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _over_defaults(cls, data: Any) -> Any:
        # A file names only what differs from a pool's defaults: `pools: {t4: {autoscaling:
        # {max_replicas: 8}}}` keeps the T4's GPU, accelerator and reservations.
        if not isinstance(data, dict):
            return data
        defaults = _pool_defaults()
        return {name: _merged(defaults[name].model_dump(), value)
                if isinstance(value, dict) and name in defaults else value
                for name, value in data.items()}


# One field per pool of the table (atelier.pools), so a pool added there is configurable here.
# (pydantic's create_model overloads do not type field definitions passed as **mapping.)
Pools = create_model(  # type: ignore[call-overload]
    "Pools",
    __base__=_PoolsBase,
    __doc__="Settings for each pool; `ServeConfig.gpu` picks the one the application runs on.",
    __module__=__name__,
    **{name: (Pool, Field(default_factory=partial(_pool_default, name),
                          description=node.description))
       for name, node in pools.POOLS.items()},
)


class Auth(BaseModel):
    """API keys: bearer tokens, one per line, read from a file or an environment variable that a
    Kubernetes Secret fills. No key is ever part of this configuration."""

    model_config = ConfigDict(extra="forbid")

    required: bool = Field(
        True, description="Refuse requests without a valid key (401). Turn off only behind a "
        "gateway that authenticates."
    )
    api_keys_file: Path | None = Field(
        None, description="File with one key per line (blank lines and # comments ignored); "
        "re-read when it changes, so keys rotate without a restart."
    )
    api_keys_env: str | None = Field(
        "ATELIER_API_KEYS", description="Environment variable with keys, one per line or comma-"
        "separated (e.g. from a Secret via secretKeyRef)."
    )


class Http(BaseModel):
    """The Serve proxy's HTTP listener."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        "127.0.0.1", description="Address the proxy binds on a local cluster. A RayService binds "
        "0.0.0.0 whatever this says (the pod's address)."
    )
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP API.")
    request_timeout_s: float = Field(
        300.0, gt=0, description="A request still running after this long is answered 408."
    )
    retry_after_s: int = Field(
        5, ge=0, description="Retry-After (seconds) sent with every 503 (overload, storage down)."
    )


class Ingress(BaseModel):
    """The FastAPI deployment in front of the model deployment (CPU only, async)."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per ingress replica.")
    max_ongoing_requests: int = Field(
        256, ge=1, description="Requests one ingress replica holds; it only awaits the model "
        "deployment, so this bounds memory, not compute."
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests the proxy queues for the ingress before answering 503."
    )
    registry_cache_s: float = Field(
        5.0, ge=0, description='How long the answer to "which version is latest" and the model '
        "list are reused; a new version is served at most this long after it is published."
    )
    replica_retries: int = Field(
        5, ge=0, le=20, description="Retries of a generation whose model replica went away (killed, "
        "its node lost): on another replica or the restarted one. A generation is idempotent (its "
        "seed fixes the images), so a retry answers what the first attempt would have."
    )
    replica_retry_s: float = Field(
        60.0, ge=0, description="Time in which those retries must succeed; after it the answer is "
        "503 with Retry-After. Give it at least a replica's restart and model load."
    )


class ServeConfig(BaseModel):
    """The Stable Diffusion serving application: HTTP API, limits, models, GPU pools."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("atelier", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
                      description="Serve application name.")
    route_prefix: str = Field("/", pattern=r"^/", description="Path the API is mounted under.")
    gpu: GpuPool = Field("cpu", description="Pool the model deployment runs on (see pools).")
    pools: Pools = Field(default_factory=Pools,
                         description="Resources, scaling and batching per pool.")
    limits: Limits = Field(default_factory=Limits, description="Bounds on every request.")
    defaults: Defaults = Field(default_factory=Defaults,
                               description="Steps and guidance of requests that leave them unset.")
    base_models: dict[str, str] = Field(
        default_factory=lambda: {"tiny": "tiny"},
        description="Base models served by name besides the registry: name -> model reference "
        "(built-in name, s3:// prefix, folder or hub id). A registered model of the same name is "
        "shadowed.",
    )
    default_model: ModelRef | None = Field(
        None, description="Model of a request that names none. Unset: requests must name one."
    )
    preload: list[ModelRef] = Field(
        default_factory=list, description="Models every model replica loads when it starts."
    )
    auth: Auth = Field(default_factory=Auth, description="API keys.")
    http: Http = Field(default_factory=Http, description="HTTP listener.")
    ingress: Ingress = Field(default_factory=Ingress, description="The ingress deployment.")

    @field_validator("base_models")
    @classmethod
    def _base_names(cls, value: dict[str, str]) -> dict[str, str]:
        from atelier.registry import validate_name

        for name in value:
            try:
                validate_name(name)
            except InvalidInput as e:
                raise ValueError(e.message) from None
        return value

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        pool = self.pool
        if pool.replica.max_batch_images < self.limits.max_images:
            raise ValueError(
                f"pools.{self.gpu}.replica.max_batch_images ({pool.replica.max_batch_images}) is "
                f"smaller than limits.max_images ({self.limits.max_images}): a request's images "
                "run in one batch"
            )
        node = pools.POOLS[self.gpu]
        if node.gpus and pool.num_gpus <= 0:
            raise ValueError(f"pools.{self.gpu}.num_gpus must be positive on a GPU pool")
        if node.gpus and pool.accelerator_type not in (None, node.ray_accelerator_type):
            raise ValueError(f"pools.{self.gpu}.accelerator_type {pool.accelerator_type!r} is not "
                             f"the {self.gpu} pool's GPU ({node.ray_accelerator_type})")
        try:
            node.check_dtype(pool.dtype, f"pools.{self.gpu}.dtype")
        except InvalidInput as e:
            raise ValueError(str(e)) from None
        if self.defaults.steps > self.limits.max_steps:
            raise ValueError("defaults.steps is above limits.max_steps")
        if self.defaults.guidance_scale > self.limits.max_guidance_scale:
            raise ValueError("defaults.guidance_scale is above limits.max_guidance_scale")
        return self

    @property
    def pool(self) -> Pool:
        """The pool the application runs on."""
        return getattr(self.pools, self.gpu)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> ServeConfig:
        """Read a YAML file (or take the defaults); top-level `overrides` that are not None win."""
        return config_file.load(cls, path, "serve config", **overrides)

    @classmethod
    def parse(cls, data: Any, where: str | None = None) -> ServeConfig:
        """Validate a dict (a file's content, a builder's args) into InvalidInput on error."""
        if isinstance(data, cls):
            return data
        return config_file.validate(cls, data, where=where or "serve config")
