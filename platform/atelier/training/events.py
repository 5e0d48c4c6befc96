"""The progress events the training job (and the sampling job it runs for class images) prints
to its log, and the one way to write and read them.

A job calls `emit(event)`; whoever reads its log (the CLI, the demo, tests, benchmarks) calls
`parse(line)` and gets the same typed event back. Their JSON Schema is schemas/job-event.schema.json.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

MARK = "ATELIER "


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Plan(_Event):
    """The job has read its dataset and knows which models it trains."""

    event: Literal["plan"] = Field("plan", description="Event kind.")
    models: list[str] = Field(description="Registry names of the models, in training order.")


class ClassImages(_Event):
    """Class images for the prior-preservation loss are ready."""

    event: Literal["class_images"] = Field("class_images", description="Event kind.")
    prompt: str = Field(description="The class prompt they show.")
    uri: str = Field(description="Where they are committed (s3://).")
    cached: bool = Field(description="True when an earlier job had already made them.")


class Sampled(_Event):
    """More images of a sampling job (class images, for one) are done."""

    event: Literal["sampled"] = Field("sampled", description="Event kind.")
    done: int = Field(description="Images done so far.")
    total: int = Field(description="Images asked for.")


class SamplesCommitted(_Event):
    """A sampling job's images are committed to storage."""

    event: Literal["samples_committed"] = Field("samples_committed", description="Event kind.")
    uri: str = Field(description="Where they are committed (s3://).")
    files: int = Field(description="Files in the commit.")


class Resumed(_Event):
    """A worker (re)started from a checkpoint rather than from the base model."""

    event: Literal["resumed"] = Field("resumed", description="Event kind.")
    model: str = Field(description="The model being trained.")
    step: int = Field(description="Step of the checkpoint it resumed from.")


class StorageOutage(_Event):
    """S3 could not be reached while the job trained a model (its Ray Train run failed) or
    published it; the job waited for S3 to answer again and went on: a run starts again and
    resumes from its last checkpoint in S3, a publication goes on under its version number."""

    event: Literal["storage_outage"] = Field("storage_outage", description="Event kind.")
    model: str = Field(description="The model being trained.")
    during: Literal["training", "publish"] = Field(description="What met the outage.")
    waited_s: float = Field(description="Seconds until S3 answered again.")
    outage: int = Field(description="Which outage of this model's training (or publication) it is: 1, 2, ...")
    error: str = Field(description="The failure, its first line.")


class WorkersFailed(_Event):
    """Ray Train saw workers of a run fail (they raised, or their process or node went away).
    It starts the run's workers again, which resume from its last checkpoint, while the run's
    max_failures allows, on whatever nodes have room."""

    event: Literal["workers_failed"] = Field("workers_failed", description="Event kind.")
    model: str = Field(description="The model being trained.")
    failure: int = Field(description="Which failure of the run this is: 1, 2, ...")
    ranks: list[int] = Field(description="World ranks of the workers that failed.")
    error: str = Field(description="What Ray said of the first failed worker, its first line.")


class NodeLost(_Event):
    """Ray declared a node of the cluster dead while the job ran (its machine or raylet went
    away); Ray Train starts the workers it held again on the nodes that remain."""

    event: Literal["node_lost"] = Field("node_lost", description="Event kind.")
    node: str = Field(description="Ray's id of the node.")
    address: str = Field(description="Its address.")
    why: str | None = Field(None, description="Ray's reason, its first line.")


class Start(_Event):
    """The training loop of one model starts."""

    event: Literal["start"] = Field("start", description="Event kind.")
    model: str = Field(description="The model being trained.")
    step: int = Field(description="First step it runs (0 unless resumed).")
    total: int = Field(description="Steps in all (max_train_steps).")
    images: int = Field(description="Instance images.")
    prior: int = Field(description="Class images for the prior loss (0: no prior loss).")
    workers: int = Field(description="Ray Train workers.")


class ModuleDtypes(BaseModel):
    """Dtypes of one module's parameters."""

    model_config = ConfigDict(extra="forbid")

    frozen: list[str] = Field(description="Dtypes of its frozen parameters.")
    trained: list[str] = Field(description="Dtypes of its trained parameters.")


class Precision(_Event):
    """The precision the first step really ran with, read off the tensors, not the config."""

    event: Literal["precision"] = Field("precision", description="Event kind.")
    model: str = Field(description="The model being trained.")
    computed_in: str = Field(description="Dtype the UNet's output came out in (autocast's).")
    weights: dict[str, ModuleDtypes] = Field(description="Per module (unet, text_encoder, vae).")
    optimizer: str = Field(description="The optimizer's class, with its module.")
    optimizer_state_bytes: dict[str, int] = Field(
        description="Bytes of optimizer state per dtype (uint8 where 8-bit AdamW quantised it).")
    loss_scaling: bool = Field(description="Whether fp16's gradient scaler is on.")
    gradient_checkpointing: bool = Field(description="Whether the UNet recomputes activations.")
    attention: list[str] = Field(description="The UNet's attention processor classes.")


class Step(_Event):
    """Training progress, every few steps and at the last."""

    event: Literal["step"] = Field("step", description="Event kind.")
    model: str = Field(description="The model being trained.")
    step: int = Field(description="Steps done.")
    total: int = Field(description="Steps in all.")
    loss: float = Field(description="Training loss of the last step.")
    steps_per_s: float = Field(description="Rate since the previous step event.")
    max_rss_mb: float = Field(description="Peak resident memory of the worker so far.")
    max_gpu_mb: float | None = Field(
        None, description="Peak GPU memory torch allocated in the worker so far (None: no GPU).")
    eta_s: float = Field(description="Seconds left at that rate.")


class Checkpoint(_Event):
    """A checkpoint was reported to Ray Train (and so to storage)."""

    event: Literal["checkpoint"] = Field("checkpoint", description="Event kind.")
    model: str = Field(description="The model being trained.")
    step: int = Field(description="Step of the checkpoint.")
    loss: float = Field(description="Mean training loss of the last steps.")
    eval_loss: float = Field(description="Loss on the fixed evaluation batch (comparable across steps).")
    quality: dict[str, float | None] | None = Field(
        None, description="CLIP-I, CLIP-T and the colour probe at this step (with eval_encoder).")


class Published(_Event):
    """A trained model is registered."""

    event: Literal["published"] = Field("published", description="Event kind.")
    model: str = Field(description="Its registry reference, name:version.")
    uri: str = Field(description="Where the registered model lives (s3://).")
    loss: float | None = Field(description="Final training loss recorded on its card.")


class Evaluated(_Event):
    """One concept of a model is evaluated (`atelier eval`)."""

    event: Literal["evaluated"] = Field("evaluated", description="Event kind.")
    model: str = Field(description="The model evaluated, name:version.")
    concept: str = Field(description="The concept just done.")
    done: int = Field(description="Concepts done so far.")
    total: int = Field(description="Concepts in all.")
    metrics: dict[str, float | None] = Field(description="The concept's metrics (None: unavailable).")


class Trial(_Event):
    """A sweep's trial reported a checkpoint's metric, or ended (`atelier sweep status`)."""

    event: Literal["trial"] = Field("trial", description="Event kind.")
    concept: str = Field(description="The concept whose search it belongs to.")
    trial: str = Field(description="Trial id (from its settings) within that search.")
    settings: dict[str, Any] = Field(description="The searched settings' values.")
    state: Literal["running", "done", "stopped", "failed"] = Field(
        description="running; done (all its steps); stopped (by early stopping); failed.")
    step: int | None = Field(None, description="Step of its latest checkpoint.")
    metric: str = Field(description="The sweep's metric.")
    value: float | None = Field(None, description="The metric at that checkpoint.")


class Promoted(_Event):
    """A sweep moved an alias to a concept's best model, or its gate refused to."""

    event: Literal["promoted"] = Field("promoted", description="Event kind.")
    model: str = Field(description="The candidate, name:version.")
    alias: str = Field(description="The alias.")
    moved: bool = Field(description="Whether the alias now names the candidate.")
    previous: int | None = Field(None, description="The version the alias named before a move.")
    why: str | None = Field(None, description="Why the gate refused.")
    webhook: str | None = Field(None, description="What the promotion webhook answered (None: none set).")


Event = Annotated[
    Plan | ClassImages | Sampled | SamplesCommitted | Resumed | StorageOutage | WorkersFailed | NodeLost
    | Start | Precision | Step | Checkpoint | Published | Evaluated | Trial | Promoted,
    Field(discriminator="event"),
]


class JobEvent(RootModel[Event]):
    """One progress event of a training or sampling job, as printed to its log."""


def line(event: Event) -> str:
    """The log line of an event: the mark, then the event as JSON."""
    return MARK + json.dumps(event.model_dump(mode="json"))


def emit(event: Event) -> None:
    """Print an event to the job's log, at once (the log is read while the job runs)."""
    print(line(event), flush=True)


class StepClock:
    """Makes a training loop's Step events: the rate since the previous event, the ETA at that
    rate and the worker's peak memory, measured one way for every loop (DreamBooth, pretraining)."""

    def __init__(self, model: str, total: int, start: int = 0):
        self.model, self.total = model, total
        self.last_step, self.last_time = start, time.monotonic()

    def emit(self, step: int, loss: float, max_gpu_mb: float | None = None) -> Step:
        now = time.monotonic()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        event = Step(model=self.model, step=step, total=self.total, loss=loss,
                     steps_per_s=round(rate, 3), max_rss_mb=max_rss_mb(), max_gpu_mb=max_gpu_mb,
                     eta_s=round((self.total - step) / max(rate, 1e-9), 1))
        emit(event)
        return event


def max_rss_mb() -> float:
    """Peak resident memory of this process so far."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def parse(text: str) -> Event | None:
    """The event in a log line, or None for any other line.

    Ray prefixes a worker's lines ("(RayTrainWorker pid=...) ") and may append a note ("[repeated
    2x across cluster]"), so the event is looked for inside the line. A line that is not a known,
    valid event is ignored rather than raised: a log is read while the job writes it, and a job of
    another version may print events this one does not know.
    """
    at = text.find(MARK + "{")
    if at < 0:
        return None
    try:
        data, _ = json.JSONDecoder().raw_decode(text, at + len(MARK))
        return JobEvent.model_validate(data).root
    except (ValueError, ValidationError):  # JSONDecodeError is a ValueError
        return None
