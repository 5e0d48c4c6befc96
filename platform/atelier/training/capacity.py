"""Whether the Ray cluster has the CPUs a training job reserves: refused at submission where it
never can, noted where it must wait."""

from __future__ import annotations

from atelier.errors import InvalidInput
from atelier.rayjobs import Jobs
from atelier.settings import Settings
from atelier.training.config import TrainConfig


def cpus_needed(config: TrainConfig) -> float:
    """CPUs the job's workers reserve (the driver reserves none)."""
    return config.num_workers * config.cpus_per_worker


def check_fits(jobs: Jobs, settings: Settings, config: TrainConfig) -> None:
    """Refuse a job the embedded Ray head can never run: it never grows, so a job needing more
    CPUs than it has would wait forever. A cluster of one's own may autoscale: not checked."""
    cpus = jobs.cpus() if settings.ray_address is None else None
    if cpus and cpus_needed(config) > cpus[1]:
        raise InvalidInput(
            f"the job needs {cpus_needed(config):g} CPUs ({config.num_workers} workers x "
            f"{config.cpus_per_worker:g}); the embedded Ray head has {cpus[1]:g}",
            where="num_workers", hint="lower num_workers or cpus_per_worker, or set "
            "ATELIER_STACK__NUM_CPUS and restart the stack")


def waiting_for_cpus(jobs: Jobs, config: TrainConfig) -> str | None:
    """Why a job just submitted will not start yet, if the cluster lacks the CPUs now."""
    cpus = jobs.cpus()
    if cpus is None or cpus[1] - cpus[0] >= cpus_needed(config):
        return None
    used, total = cpus
    return (f"the job waits for {cpus_needed(config):g} free CPUs: {total - used:g} of {total:g} are "
            "free now (Serve replicas and other jobs hold the rest: `atelier serve status`, "
            "`atelier train list`)")
