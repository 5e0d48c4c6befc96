"""What a training job's log says so far: its events folded into one status."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from atelier.rayjobs import Jobs
from atelier.training import events


class Progress(BaseModel):
    """What a training job's log says so far."""

    model_config = ConfigDict(extra="forbid")

    status: str = Field(description="The Ray job's status (PENDING, RUNNING, SUCCEEDED, ...).")
    models: list[str] = Field([], description="Models the job trains, once it has planned them.")
    model: str | None = Field(None, description="The model training now (or last).")
    step: int | None = Field(None, description="Steps done of that model.")
    total: int | None = Field(None, description="Steps in all of that model.")
    loss: float | None = Field(None, description="Latest training loss.")
    eta_s: float | None = Field(None, description="Seconds left of that model, at the latest rate.")
    checkpoint_step: int | None = Field(None, description="Step of the latest checkpoint.")
    resumed_from: int | None = Field(None, description="Step a worker last resumed from.")
    outages: int = Field(0, description="S3 outages the job waited out (a run started again, or a "
                         "publication that went on).")
    worker_failures: int = Field(0, description="Times Ray Train started a run's failed workers again.")
    last_failure: str | None = Field(None, description="What Ray said of the latest failed worker.")
    nodes_lost: list[str] = Field([], description="Addresses of the nodes Ray declared dead while the job ran.")
    # What was counted: Ray may print a line twice, and an event counts once.
    _seen: set[tuple] = PrivateAttr(default_factory=set)
    published: list[str] = Field([], description="Models registered so far, as name:version.")
    message: str | None = Field(None, description="Ray's message about the job (why it failed).")


def progress(jobs: Jobs, job_id: str) -> Progress:
    """The job's status and everything its log says so far (for `atelier train status`)."""
    info = jobs.info(job_id)
    p = Progress(status=str(info.status.value), message=info.message)
    for line in jobs.logs(job_id).splitlines():
        fold(p, line)
    return p


def fold(p: Progress, line: str) -> bool:
    """Apply one log line to `p`; whether it was an event. Ray prints a worker's line more than
    once, so applying a line twice changes nothing."""
    match events.parse(line):
        case events.Plan() as e:
            p.models = e.models
        case events.Start() as e:
            p.model, p.step, p.total = e.model, e.step, e.total
        case events.Step() as e:
            p.model, p.step, p.total, p.loss, p.eta_s = e.model, e.step, e.total, e.loss, e.eta_s
        case events.Checkpoint() as e:
            p.checkpoint_step = e.step
        case events.Resumed() as e:
            p.resumed_from = e.step
        case events.StorageOutage() as e:
            if _first(p, ("outage", e.model, e.during, e.outage)):
                p.outages += 1
        case events.WorkersFailed() as e:
            if _first(p, ("failed", e.model, e.failure)):
                p.worker_failures += 1
                p.last_failure = e.error
        case events.NodeLost() as e:
            if _first(p, ("node", e.node)):
                p.nodes_lost.append(e.address)
        case events.Published() as e:
            if e.model not in p.published:
                p.published.append(e.model)
        case None:
            return False
    return True


def _first(p: Progress, key: tuple) -> bool:
    """Whether `key` is seen for the first time (and note it)."""
    if key in p._seen:
        return False
    p._seen.add(key)
    return True
