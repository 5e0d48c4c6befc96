"""`atelier bench train`: short real training jobs, one per pool and pass, timed from the job's
own events, into the result format `atelier report` costs per fine-tune.

Each run is the platform's real path (dataset committed to storage, a Ray job, Ray Train workers,
checkpoints, a registered model), so its seconds are what a user pays for, not a bare loop's. The
pools' runs interleave (A B, B A, ...) like `atelier bench serve`'s passes.

A run trains one concept (the first of the file unless named): one fine-tune, which is what
`atelier report` prices per fine-tune.

What each figure is, read off the events the job prints (atelier.training.events):
- seconds: submit to the job's end (dataset upload, scheduling, model load, steps, checkpoints,
  registration);
- time to first step: submit to the Precision event, which the loop prints once its first
  optimiser step is done;
- steps/s: the steps of the run over the time its Step events account for (each event gives its
  interval's rate), so model loading is out and checkpoint saves are in;
- peak memory: the GPU memory torch allocated, where the worker has a GPU; else its peak RSS.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from atelier import pools
from atelier.bench.results import Environment, Spread, TrainResult, TrainRun
from atelier.catalogue.schema import ConceptsFile
from atelier.errors import InvalidInput
from atelier.rayjobs import Jobs
from atelier.settings import Settings
from atelier.training import events
from atelier.training.config import TrainConfig
from atelier.training.submit import submit


@dataclass(frozen=True)
class TrainPool:
    """One pool to train on: the label the report shows and the node pool it runs on."""

    label: str
    pool: str  # a name of atelier.pools.POOLS
    prices_as: str | None = None

    @property
    def stand_in(self) -> bool:
        return pools.POOLS[self.pool].gpus == 0

    @classmethod
    def parse(cls, text: str, prices_as: dict[str, str]) -> TrainPool:
        """"LABEL=POOL" or "POOL" (the label is then the pool's name)."""
        label, _, pool = text.partition("=") if "=" in text else (text, "", text)
        if pool not in pools.POOLS:
            raise InvalidInput(f"no pool {pool!r} ({', '.join(pools.POOLS)})", where="--pool")
        if not label:
            raise InvalidInput("empty pool label", where="--pool")
        default = pool if pools.POOLS[pool].gpus else None  # a GPU pool prices as itself
        return cls(label, pool, prices_as.get(label, default))

    def config(self, base: TrainConfig) -> TrainConfig:
        """`base` as run on this pool: on a GPU pool, one GPU per worker of that type, with the
        study's gradient checkpointing (mixed precision and 8-bit AdamW follow their GPU defaults)."""
        if not pools.POOLS[self.pool].gpus:
            return base.model_copy(update={"use_gpu": False, "gpu_type": None})
        data = base.model_dump() | {"use_gpu": True, "gpu_type": self.pool}
        if "gradient_checkpointing" not in base.model_fields_set:
            data["gradient_checkpointing"] = True
        return TrainConfig.model_validate(data)


@dataclass
class _Run:
    seconds: float
    first_step_s: float | None
    steps_per_s: float | None
    peak_mb: float | None
    models: list[str]


def run_once(settings: Settings, concepts: Path, config: TrainConfig, concept: str, *,
             on_event: Callable[[events.Event], None] | None = None,
             timeout_s: float = 6 * 3600) -> _Run:
    """One job, submitted and followed to its end; AtelierError if it does not succeed."""
    jobs = Jobs(settings)
    started = time.monotonic()
    job_id, _ = submit(settings, concepts, config, concepts=[concept],
                       run_name=f"bench-{uuid.uuid4().hex[:8]}")
    first_step: list[float] = []
    intervals: list[tuple[int, float]] = []  # (steps, seconds) of each Step event's interval
    last_step = [0]
    peaks: list[float] = []
    published: list[str] = []

    def on_line(line: str) -> None:
        event = events.parse(line)
        match event:
            case events.Precision():
                first_step.append(time.monotonic() - started)
            case events.Step() as e:
                steps = e.step - last_step[0]
                if steps > 0 and e.steps_per_s > 0:
                    intervals.append((steps, steps / e.steps_per_s))
                last_step[0] = e.step
                peaks.append(e.max_gpu_mb if e.max_gpu_mb is not None else e.max_rss_mb)
            case events.Published() as e:
                published.append(e.model)
        if event is not None and on_event:
            on_event(event)

    status = jobs.wait(job_id, on_line=on_line, timeout_s=timeout_s)
    jobs.raise_for(job_id, status)
    seconds = time.monotonic() - started
    steps, spent = sum(s for s, _ in intervals), sum(t for _, t in intervals)
    return _Run(seconds, first_step[0] if first_step else None,
                steps / spent if spent > 0 else None, max(peaks) if peaks else None, published)


def measure(settings: Settings, concepts: Path, base: TrainConfig, targets: Sequence[TrainPool], *,
            concept: str | None = None, repeats: int = 1, on_event: Callable[[str, events.Event], None] | None = None,
            command: str = "") -> TrainResult:
    """Every pool `repeats` times, interleaved; one TrainRun per pool."""
    if not targets:
        raise InvalidInput("nothing to measure: give at least one pool", where="--pool")
    if repeats < 1:
        raise InvalidInput("repeats must be at least 1", where="--repeats")
    concept = concept or ConceptsFile.load(concepts).concepts[0].name
    done: dict[str, list[_Run]] = {t.label: [] for t in targets}
    for repeat in range(repeats):
        for target in targets if repeat % 2 == 0 else list(targets)[::-1]:
            def said(event: events.Event, label: str = target.label) -> None:
                if on_event:
                    on_event(label, event)
            done[target.label].append(run_once(settings, concepts, target.config(base), concept,
                                               on_event=said))
    runs = []
    for target in targets:
        rs = done[target.label]
        firsts = [r.first_step_s for r in rs if r.first_step_s is not None]
        rates = [r.steps_per_s for r in rs if r.steps_per_s is not None]
        peaks = [r.peak_mb for r in rs if r.peak_mb is not None]
        if not rates or not firsts:
            raise InvalidInput(f"{target.label}: the job printed no step events to time",
                               where="bench train", hint="is the job from this version of Atelier?")
        runs.append(TrainRun(
            pool=target.label, stand_in=target.stand_in, prices_as=target.prices_as,
            config=target.config(base).model_dump(mode="json"),
            seconds=Spread.of([r.seconds for r in rs]), steps_per_s=Spread.of(rates),
            time_to_first_step_s=Spread.of(firsts), peak_memory_mb=max(peaks) if peaks else None,
            models=[m for r in rs for m in r.models]))
    notes = [f"each run fine-tunes one concept: {concept}",
             "peak memory: GPU memory allocated by torch on a GPU pool, peak RSS of the worker "
             "on a CPU one"]
    if repeats < 2:
        notes.append("one run per pool: no figure has a spread")
    return TrainResult(environment=Environment.capture(), command=command, notes=notes, runs=runs)
