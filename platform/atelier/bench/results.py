"""The one result format of every measurement: `atelier bench serve`, `atelier bench train` and
benchmarks/gpu_sd.py write it, `atelier report` reads it. One JSON file per run, versioned by
`format`, with the machine it ran on; its JSON Schema is schemas/bench-result.schema.json.

A pool here is what was measured, named as the person measuring chose ("t4", or "cpu-b1" for a
local stand-in). `stand_in` marks a pool that imitates one (two local Serve applications with
other settings), so that no report ever presents a CPU figure as a GPU's; `prices_as` names the
catalogue pool that prices it.
"""

from __future__ import annotations

import json
import os
import platform as stdlib_platform
import socket
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from atelier import config_file
from atelier.errors import InvalidInput, NotFound
from atelier.files import write_atomic


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Environment(_Model):
    """Where a result was measured: the machine, the accelerator and the software."""

    hostname: str = Field(description="The measuring machine (the load generator's, for serve).")
    os: str = Field(description="Operating system and kernel.")
    python: str
    cpu: str = Field(description="CPU model, as the OS names it.")
    cpus: int = Field(description="Logical CPUs.")
    gpu: str | None = Field(None, description="GPU name (torch.cuda), None on a machine without one.")
    gpu_memory_gb: float | None = Field(None, description="Its memory in GB.")
    driver: str | None = Field(None, description="NVIDIA driver version.")
    cuda: str | None = Field(None, description="CUDA version torch was built with.")
    packages: dict[str, str | None] = Field(
        description="Versions of torch, diffusers, transformers, ray, xformers, bitsandbytes, atelier "
        "(None: not installed).")

    @classmethod
    def capture(cls) -> Environment:
        """This process's machine. Imports torch only to ask about the GPU."""
        import torch

        gpu = memory = driver = None
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gpu, memory = props.name, round(props.total_memory / 1e9, 1)
            driver = _nvidia_driver()
        packages = {name: _version(name) for name in (
            "torch", "diffusers", "transformers", "ray", "xformers", "bitsandbytes", "atelier")}
        return cls(hostname=socket.gethostname(), os=f"{stdlib_platform.system()} "
                   f"{stdlib_platform.release()}", python=stdlib_platform.python_version(),
                   cpu=_cpu_name(), cpus=os.cpu_count() or 1, gpu=gpu, gpu_memory_gb=memory,
                   driver=driver, cuda=torch.version.cuda, packages=packages)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return stdlib_platform.processor() or stdlib_platform.machine()


def _nvidia_driver() -> str | None:
    try:
        return Path("/proc/driver/nvidia/version").read_text().split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        return None


class Spread(_Model):
    """A figure over repeats: its median, and the lowest and highest repeat."""

    median: float
    low: float
    high: float
    repeats: int = Field(description="Repeats it is taken over.")

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        import statistics

        return cls(median=statistics.median(values), low=min(values), high=max(values),
                   repeats=len(values))


class Target(_Model):
    """One pool measured by `atelier bench serve`: an endpoint (one Serve application)."""

    pool: str = Field(description="The name the report shows.")
    url: str = Field(description="The API's address.")
    model: str | None = Field(None, description="Model asked for (None: the endpoint's default).")
    stand_in: bool = Field(False, description="A local imitation of a pool, never costed as a GPU.")
    prices_as: str | None = Field(None, description="Catalogue pool that prices it (t4, a100).")
    description: str = Field("", description="What the pool is (its settings, for a stand-in).")


class Workload(_Model):
    """What each request asks for."""

    prompts: list[str] = Field(min_length=1, description="Prompts, used in turn.")
    width: int
    height: int
    steps: int
    n: int = Field(1, description="Images per request.")
    scheduler: str | None = None
    guidance_scale: float | None = None


class Request(_Model):
    """One request as the load generator saw it."""

    pool: str
    level: float = Field(description="Concurrency (closed loop) or arrivals per second (open loop).")
    repeat: int = Field(description="Which pass over the levels (passes interleave the pools).")
    start_s: float = Field(description="Sent at, seconds after the run began.")
    latency_s: float = Field(description="Until the last byte of the answer.")
    status: int = Field(description="HTTP status; 0: no answer (connection failed, timed out).")
    bytes: int
    images: int = Field(description="Images in a successful answer.")
    gpu: str | None = Field(None, description="The replica's accelerator (X-Atelier-GPU).")
    batch_images: int | None = Field(None, description="Images in the replica's batch (X-Atelier-Batch-Images).")


class Level(_Model):
    """One pool at one load level, summarised over its repeats (warm-up excluded)."""

    pool: str
    level: float
    requests: int
    ok: int
    error_rate: float = Field(description="Share of requests not answered 200.")
    rate_503: float = Field(description="Share answered 503 (overload).")
    images_per_s: Spread = Field(description="Images answered per second of the level's window.")
    p50_s: Spread | None = Field(None, description="Latency of answered requests; None: none was.")
    p95_s: Spread | None = None
    p99_s: Spread | None = None


class Sample(_Model):
    """Serve's state of one pool's deployment at one moment."""

    t_s: float = Field(description="Seconds after the run began.")
    pool: str
    replicas: dict[str, int] = Field(description="Replica count by state (RUNNING, STARTING, ...).")
    ongoing: int | None = Field(None, description="Requests in flight or queued at the pool, as "
                                "the load generator counts them.")


class ColdStart(_Model):
    pool: str
    seconds: float = Field(description="From the first request at zero replicas to its image.")
    status: int


class Comparison(_Model):
    """A ratio between two pools at one level, with its interval over the interleaved repeats."""

    metric: Literal["images_per_s", "p50_s", "p95_s"]
    level: float
    a: str
    b: str
    ratio: float = Field(description="a's figure over b's, from the medians.")
    low: float = Field(description="The interval's low end (bootstrap over repeats).")
    high: float


class _Result(_Model):
    format: Literal["atelier-bench/1"] = Field("atelier-bench/1", description="Result format version.")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    environment: Environment
    command: str = Field("", description="The command line that made it.")
    notes: list[str] = Field(default_factory=list)


class ServeResult(_Result):
    kind: Literal["serve"] = "serve"
    mode: Literal["closed", "open"] = Field(description="closed: a fixed number of clients; "
                                            "open: Poisson arrivals at a rate.")
    levels: list[float]
    duration_s: float | None = Field(None, description="Seconds per level and pool, if timed.")
    requests_per_level: int | None = Field(None, description="Requests per level and pool, if counted.")
    warmup: int = Field(description="Requests per pool sent first and left out.")
    targets: list[Target]
    workload: Workload
    levels_summary: list[Level]
    comparisons: list[Comparison] = Field(default_factory=list)
    requests: list[Request]
    samples: list[Sample] = Field(default_factory=list)
    cold_starts: list[ColdStart] = Field(default_factory=list)


class TrainRun(_Model):
    pool: str
    stand_in: bool = False
    prices_as: str | None = None
    config: dict[str, Any] = Field(description="The training config, as run.")
    seconds: Spread = Field(description="Submit to registered model.")
    steps_per_s: Spread
    time_to_first_step_s: Spread = Field(description="Submit to the first step's event.")
    peak_memory_mb: float | None = Field(None, description="Peak GPU memory (CPU: peak RSS).")
    models: list[str] = Field(default_factory=list, description="Models the runs registered.")


class TrainResult(_Result):
    kind: Literal["train"] = "train"
    runs: list[TrainRun]


class PipelineRow(_Model):
    """One configuration of the SD pipeline or its training step, measured on this machine."""

    task: Literal["generate", "train"]
    model: str = Field(description="Architecture (sd15, tiny).")
    device: str
    dtype: str
    attention: str = Field(description="sdpa, xformers, ...")
    batch: int
    height: int
    width: int
    compiled: bool = False
    optimizer: str | None = None
    gradient_checkpointing: bool | None = None
    it_s: Spread | None = Field(None, description="UNet steps per second (denoising iterations, or "
                                "training steps); None for a row that could not run.")
    images_per_s: Spread | None = None
    peak_memory_mb: float | None = None
    error: str | None = Field(None, description="Why it could not run here (then no figures).")

    @model_validator(mode="after")
    def _figures_or_error(self) -> PipelineRow:
        if (self.it_s is None) == (self.error is None):
            raise ValueError("a row has its figures or an error, one of the two")
        return self


class PipelineResult(_Result):
    kind: Literal["pipeline"] = "pipeline"
    rows: list[PipelineRow]


Result = Annotated[ServeResult | TrainResult | PipelineResult, Field(discriminator="kind")]


class BenchResult(RootModel[Result]):
    """One measurement run: serve load, training jobs, or the pipeline on one GPU."""


def save(result: ServeResult | TrainResult | PipelineResult, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (result.model_dump_json(indent=1) + "\n").encode())
    return path


def load(path: Path) -> ServeResult | TrainResult | PipelineResult:
    """A result file; NotFound, or InvalidInput naming the field, for a file that is not one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise NotFound("bench result not found", where=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"cannot read the bench result: {e}", where=str(path)) from None
    try:
        data = json.loads(text)  # JSON, not the YAML loader: a run holds thousands of requests
    except json.JSONDecodeError as e:
        raise InvalidInput(f"not a bench result (invalid JSON at line {e.lineno}): {e.msg}",
                           where=str(path)) from None
    return config_file.validate(BenchResult, data, where=str(path)).root
