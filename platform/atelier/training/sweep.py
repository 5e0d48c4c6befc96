"""`atelier sweep`: the study's search as one command. What a sweep file says, how its search
spaces become Ray Tune's, and what a finished sweep reports.

A sweep file is a training config whose fields may be search spaces, plus how to search:

    metric: clip_i                 # a per-checkpoint quality metric (the shop CLIP's by default)
    train:                         # TrainConfig: fixed values, or a space
      base_model: shop
      eval_encoder: shop-clip
      learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
      max_train_steps: {grid: [100, 200]}
      method: {grid: [full, lora]}
      lora_rank: {choice: [4, 8]}
    samples: 2                     # repeats of each grid point, each with its own seed and draws
    early_stopping: {grace_steps: 50, reduction_factor: 2}   # ASHA; null: every trial runs out

Every value a space can take is checked against TrainConfig before any compute is spent. The job
(`atelier_jobs.sweep`) runs one Ray Tune search per concept: each trial is a Ray Train run of the
DreamBooth loop, measured at every checkpoint; the best finished trial's model is registered with
its lineage (the sweep, the trial, the metric).
"""

from __future__ import annotations

import itertools
import math
import shlex
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from atelier.errors import InvalidInput, NotFound, describe_validation_error
from atelier.training import events
from atelier.training.config import TrainConfig
from atelier.training.spec import TrainJobSpec

# Per-checkpoint quality (TrainConfig.eval_encoder) and which way is better.
METRICS: dict[str, Literal["max", "min"]] = {"clip_i": "max", "clip_t": "max", "colour_distance": "min"}
SPACE_KINDS = ("grid", "choice", "uniform", "loguniform")


class Space(BaseModel):
    """One field's search space: exactly one of its kinds."""

    model_config = ConfigDict(extra="forbid")

    grid: list[Any] | None = Field(None, min_length=1, description="Every value, each its own trials.")
    choice: list[Any] | None = Field(None, min_length=1, description="One value drawn per trial.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], drawn uniformly.")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], drawn log-uniformly.")

    @model_validator(mode="after")
    def _one_kind(self) -> Space:
        kinds = [k for k in SPACE_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a search space is exactly one of {', '.join(SPACE_KINDS)}")
        for kind in ("uniform", "loguniform"):
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind}: low must be below high")
            if kind == "loguniform" and bounds is not None and bounds[0] <= 0:
                raise ValueError("loguniform: bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SPACE_KINDS if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """Values to check against TrainConfig: every listed value, or a range's bounds."""
        value = getattr(self, self.kind)
        return list(value)

    def to_tune(self) -> Any:
        from ray import tune

        value = getattr(self, self.kind)
        match self.kind:
            case "grid":
                return tune.grid_search(value)
            case "choice":
                return tune.choice(value)
            case "uniform":
                return tune.uniform(*value)
            case _:
                return tune.loguniform(*value)


class EarlyStopping(BaseModel):
    """ASHA: at each rung, trials below the top 1/reduction_factor on the metric stop."""

    model_config = ConfigDict(extra="forbid")

    grace_steps: int = Field(50, ge=1, description="Steps every trial runs before it can be stopped.")
    reduction_factor: float = Field(2, gt=1, description="Rungs keep the best 1/reduction_factor.")


class SweepConfig(BaseModel):
    """A sweep file."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal["clip_i", "clip_t", "colour_distance"] = Field(
        "clip_i", description="Per-checkpoint quality metric the search optimises.")
    train: dict[str, Any] = Field(
        default_factory=dict, description="TrainConfig fields: a value, or a search space "
                                          "({grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, "
                                          "{loguniform: [lo, hi]}).")
    samples: int = Field(1, ge=1, le=1000, description="Repeats of each grid point, each with its own "
                                                        "seed (seed, seed+1, ...) and draws of the random spaces.")
    early_stopping: EarlyStopping | None = Field(
        default_factory=EarlyStopping, description="ASHA early stopping; null: none.")
    max_concurrent: int | None = Field(
        None, ge=1, description="Trials at once (default: as many as the cluster's CPUs or GPUs fit).")

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        fixed, spaces = self.split()
        for name, space in spaces.items():
            for value in space.candidates():
                try:
                    TrainConfig(**(fixed | {name: value}))
                except ValidationError as e:
                    raise ValueError(f"train.{name}: {value!r} is not a valid value "
                                     f"({describe_validation_error(e)})") from None
        base = self.base()
        if not base.eval_encoder:
            raise ValueError("train.eval_encoder: a sweep measures every checkpoint; name an "
                             "encoder (shop-clip offline)")
        if self.early_stopping and base.checkpoint_every > self.early_stopping.grace_steps:
            raise ValueError(f"early_stopping.grace_steps ({self.early_stopping.grace_steps}) is "
                             f"less than train.checkpoint_every ({base.checkpoint_every}): trials "
                             "could be stopped before they are first measured")
        return self

    def split(self) -> tuple[dict[str, Any], dict[str, Space]]:
        """(fixed values, search spaces) of the train section."""
        fixed, spaces = {}, {}
        for name, value in self.train.items():
            if name not in TrainConfig.model_fields:
                raise ValueError(f"train.{name}: not a training setting")
            if name == "seed" and isinstance(value, dict) and self.samples > 1:
                raise ValueError("train.seed: searched, and samples > 1 repeats over seeds too")
            if isinstance(value, dict) and set(value) & set(SPACE_KINDS):
                try:
                    spaces[name] = Space.model_validate(value)
                except ValidationError as e:
                    raise ValueError(f"train.{name}: {describe_validation_error(e)}") from None
            else:
                fixed[name] = value
        return fixed, spaces

    def base(self) -> TrainConfig:
        """The fixed settings, with each space at its first candidate: what every trial shares."""
        fixed, spaces = self.split()
        return TrainConfig(**(fixed | {n: s.candidates()[0] for n, s in spaces.items()}))

    @property
    def mode(self) -> Literal["max", "min"]:
        return METRICS[self.metric]

    def trials_per_concept(self) -> int:
        """Trials one concept's search runs: the grid's points times `samples`."""
        _, spaces = self.split()
        grid = math.prod(len(s.grid) for s in spaces.values() if s.grid is not None)
        return grid * self.samples

    def grid_points(self) -> list[dict[str, Any]]:
        """The grid's points (the random spaces left out), for planning and tests."""
        _, spaces = self.split()
        names = [n for n, s in spaces.items() if s.grid is not None]
        return [dict(zip(names, values, strict=True))
                for values in itertools.product(*(spaces[n].grid or [] for n in names))]

    @classmethod
    def load(cls, path: str | Path) -> SweepConfig:
        path = Path(path)
        if not path.is_file():
            raise NotFound("sweep file not found", where=str(path))
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise InvalidInput(f"not valid YAML: {e}", where=str(path)) from None
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise InvalidInput(describe_validation_error(e), where=str(path)) from None


class Promotion(BaseModel):
    """What the sweep does with each concept's best model once registered."""

    model_config = ConfigDict(extra="forbid")

    alias: str = Field(description='The alias to move ("prod").')
    promote_if: str | None = Field(None, description='A gate ("clip_i > 0.8"); unset: always.')
    webhook: str | None = Field(None, description="Told of each move (the submitter's setting).")


class SweepSpec(BaseModel):
    """The sweep job's one argument."""

    model_config = ConfigDict(extra="forbid")

    sweep: SweepConfig
    job: TrainJobSpec = Field(description="The dataset, concepts and run name (the sweep's name); "
                                          "its config is the sweep's base().")
    promote: Promotion | None = Field(None, description="Promote each concept's best model.")


class TrialResult(BaseModel):
    """One trial: its settings, its metric at each checkpoint, and what it cost."""

    model_config = ConfigDict(extra="forbid")

    concept: str
    trial: str = Field(description="Trial id within the concept's search.")
    settings: dict[str, Any] = Field(description="The searched settings' values.")
    curve: list[dict[str, float | None]] = Field(description="step and the metrics at each checkpoint.")
    steps: int = Field(description="Steps trained (fewer than max_train_steps if stopped early).")
    stopped_early: bool
    seconds: float = Field(description="Time its training loop ran (steps and checkpoint measurements; "
                                       "not start-up or waiting for a worker).")
    steps_per_s: float | None = None
    cost_usd: float | None = Field(None, description="seconds x the pool's hourly price, when known.")
    final: float | None = Field(None, description="The metric at the last checkpoint.")
    error: str | None = None


class SweepResults(BaseModel):
    """What `atelier sweep show` prints and the job commits under sweeps/<name>/."""

    model_config = ConfigDict(extra="forbid")

    name: str
    metric: str
    mode: Literal["max", "min"]
    config: SweepConfig
    trials: list[TrialResult]
    best: dict[str, str] = Field(default_factory=dict, description="concept -> registered model (name:version).")
    best_trial: dict[str, str] = Field(default_factory=dict, description="concept -> its trial id.")


def pareto_front(points: list[tuple[float, float]], mode: Literal["max", "min"]) -> list[int]:
    """Indices of the (cost, quality) points no other point beats on both: cheaper or as cheap,
    and better or as good, strictly on one."""
    def better(q1: float, q2: float) -> bool:
        return q1 > q2 if mode == "max" else q1 < q2

    front = []
    for i, (cost, quality) in enumerate(points):
        dominated = any((c <= cost and (better(q, quality) or q == quality) and (c < cost or better(q, quality)))
                        for j, (c, q) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def write_plots(results: SweepResults, folder: Path) -> list[Path]:
    """curves.png (the metric against steps, a line per trial, a panel per concept) and
    pareto.png (final quality against training cost; the front joined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concepts = sorted({t.concept for t in results.trials})
    written = []
    fig, axes = plt.subplots(1, max(1, len(concepts)), figsize=(5 * max(1, len(concepts)), 4), squeeze=False)
    for ax, concept in zip(axes[0], concepts, strict=False):
        for t in (t for t in results.trials if t.concept == concept):
            curve = [(p["step"], p.get(results.metric)) for p in t.curve if p.get(results.metric) is not None]
            if curve:
                label = ", ".join(f"{k}={v}" for k, v in t.settings.items())
                ax.plot(*zip(*curve, strict=True), marker="o", label=label + (" (stopped)" if t.stopped_early else ""))
        ax.set_title(concept)
        ax.set_xlabel("step")
        ax.set_ylabel(results.metric)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=100)
    plt.close(fig)
    written.append(folder / "curves.png")

    finished = [t for t in results.trials if t.final is not None]
    unit = "USD" if finished and all(t.cost_usd is not None for t in finished) else "seconds"
    fig, ax = plt.subplots(figsize=(5 * max(1, min(len(concepts), 2)), 4))
    # One front per concept: scores of different concepts' photos do not compare.
    for concept in concepts:
        mine = [t for t in finished if t.concept == concept]
        if not mine:
            continue
        points = [((t.cost_usd or 0.0) if unit == "USD" else t.seconds, float(t.final or 0.0)) for t in mine]
        dots = ax.scatter(*zip(*points, strict=True), label=concept)
        front = sorted(points[i] for i in pareto_front(points, results.mode))
        ax.plot(*zip(*front, strict=True), color=dots.get_facecolor()[0], alpha=0.6, marker="o",
                markersize=11, markerfacecolor="none")  # ringed: the front's trials
    if finished:
        ax.legend(title="ringed and joined: each concept's Pareto front", fontsize=7, title_fontsize=7)
    ax.set_xlabel(f"training cost ({unit})")
    ax.set_ylabel(f"{results.metric} at the last checkpoint")
    fig.tight_layout()
    fig.savefig(folder / "pareto.png", dpi=100)
    plt.close(fig)
    written.append(folder / "pareto.png")
    return written


def default_name() -> str:
    """A sweep's name when the user gives none."""
    return f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"


def entrypoint(spec: SweepSpec) -> str:
    """The sweep job's command line, the same on the local head and in a KubeRay RayJob."""
    return f"python -m atelier_jobs.sweep --spec {shlex.quote(spec.model_dump_json())}"


def check_promotion(promote: Promotion | None) -> None:
    """A bad alias or gate fails at submission, not after the search."""
    if promote is None:
        return
    from atelier.models.ref import validate_alias
    from atelier.promotion import parse_gate

    validate_alias(promote.alias)
    if promote.promote_if:
        parse_gate(promote.promote_if)


def submit_sweep(settings, concepts_path: Path, sweep: SweepConfig, *, concepts: list[str] | None = None,
                 name: str | None = None, promote: Promotion | None = None,
                 progress=None) -> tuple[str, SweepSpec]:
    """Check everything, commit the dataset, submit the sweep job to the Ray Jobs API; its id
    and spec."""
    from atelier.rayjobs import Jobs
    from atelier.training.capacity import check_fits
    from atelier.training.submit import prepare

    jobs = Jobs(settings)
    base = sweep.base()
    check_promotion(promote)

    def check_cluster() -> None:
        _ = jobs.client
        check_fits(jobs, settings, base)

    job = prepare(settings, Path(concepts_path), base, concepts=concepts, run_name=name or default_name(),
                  before_upload=check_cluster, progress=progress)
    spec = SweepSpec(sweep=sweep, job=job, promote=promote)
    job_id = jobs.submit(entrypoint(spec), metadata={"atelier": "sweep", "run": job.run_name})
    return job_id, spec


def submit_sweep_rayjob(settings, concepts_path: Path, sweep: SweepConfig, *, gpu: str, namespace: str,
                        concepts: list[str] | None = None, name: str | None = None,
                        promote: Promotion | None = None, said=lambda line: None) -> str:
    """The sweep as a KubeRay RayJob on the `gpu` pool, its worker group sized for
    `max_concurrent` trials (1 when unset); the RayJob's name."""
    from atelier.kube import submit_rayjob

    check_promotion(promote)
    return submit_rayjob(
        settings, concepts_path, sweep.base(), gpu=gpu, namespace=namespace, concepts=concepts,
        run_name=name or default_name(), said=said, concurrent=sweep.max_concurrent or 1,
        command=lambda job: entrypoint(SweepSpec(sweep=sweep, job=job, promote=promote)))


def read_results(settings, name: str) -> tuple[SweepResults, Path]:
    """A finished sweep's results, and the local copy of sweeps/<name>/ they were read from,
    with its plots (NotFound while it runs or if unknown)."""
    from atelier.storage import Storage

    storage = Storage(settings)
    folder = storage.fetch_cached(storage.uri("sweeps", name))
    return SweepResults.model_validate_json((folder / "results.json").read_text()), folder


class SweepProgress(BaseModel):
    """What a sweep job's log says so far (`atelier sweep status`)."""

    model_config = ConfigDict(extra="forbid")

    status: str = Field(description="The Ray job's status (PENDING, RUNNING, SUCCEEDED, ...).")
    message: str | None = Field(None, description="Ray's message about the job (why it failed).")
    trials: list[events.Trial] = Field([], description="Each trial's latest report, in the order first seen.")
    published: list[str] = Field([], description="Best models registered so far, as name:version.")
    promotions: list[events.Promoted] = Field([], description="Alias moves made or refused so far.")


def sweep_progress(jobs, job_id: str) -> SweepProgress:
    """The sweep job's status, each trial's latest checkpoint metric or end, and the models
    published so far, from the job's log."""
    info = jobs.info(job_id)
    p = SweepProgress(status=str(info.status.value), message=info.message)
    latest: dict[tuple[str, str], events.Trial] = {}
    for line in jobs.logs(job_id).splitlines():
        match events.parse(line):
            case events.Trial() as e:
                known = latest.get((e.concept, e.trial))
                # An end is final; of two reports, the later checkpoint wins (Ray may repeat a line).
                if known is None or (known.state == "running" and (
                        e.state != "running" or (e.step or 0) >= (known.step or 0))):
                    latest[(e.concept, e.trial)] = e
            case events.Published() as e:
                if e.model not in p.published:
                    p.published.append(e.model)
            case events.Promoted() as e:
                if e not in p.promotions:
                    p.promotions.append(e)
    p.trials = list(latest.values())
    return p
