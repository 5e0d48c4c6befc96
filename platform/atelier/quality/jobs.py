"""Running `atelier eval` from the control plane: submitting the evaluation job, and turning the
registry's evaluations into a static gallery."""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

from atelier.rayjobs import Jobs
from atelier.settings import Settings
from atelier.storage import Storage
from atelier.training import events


def run_eval(settings: Settings, spec, *, on_event: Callable[[events.Event], None] | None = None):
    """Submit the evaluation of one model, wait for it, and return its Evaluation."""
    from atelier.registry import Registry

    storage = Storage(settings)
    storage.check()
    registry = Registry(storage)
    _, card = registry.get(spec.model)  # an unknown model fails here, before a job starts
    spec = spec.model_copy(update={"model": card.ref})  # the exact version, even if one is published meanwhile
    jobs = Jobs(settings)
    job_id = jobs.submit(f"python -m atelier_jobs.evaluate --spec {shlex.quote(spec.model_dump_json())}",
                         metadata={"kind": "evaluate", "model": card.ref})
    seen: set[str] = set()

    def on_line(line: str) -> None:
        event = events.parse(line)
        if event and on_event and (key := event.model_dump_json()) not in seen:
            seen.add(key)  # Ray may forward a worker's line twice
            on_event(event)

    status = jobs.wait(job_id, on_line=on_line, timeout_s=24 * 3600)
    jobs.raise_for(job_id, status)
    evaluation = registry.evaluation(card)
    if evaluation is None:
        raise RuntimeError(f"the evaluation job of {card.ref} finished without recording a result")
    return evaluation


def write_html(settings: Settings, refs: list[str], out: Path, *, title: str = "Atelier: model quality"
               ) -> Path:
    """A static gallery of the models' latest evaluations: each concept's grid and metrics."""
    from atelier.errors import NotFound
    from atelier.quality.gallery import GalleryEntry, write_gallery
    from atelier.registry import Registry

    storage = Storage(settings)
    registry = Registry(storage)
    entries = []
    (out / "grids").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        _, card = registry.get(ref)
        evaluation = registry.evaluation(card)
        if evaluation is None:
            raise NotFound(f"{card.ref} has not been evaluated", where=ref,
                           hint=f"run `atelier eval {card.ref}`")
        folder = storage.fetch_cached(registry.evaluation_uri(card))
        for concept in evaluation.concepts:
            grid = f"grids/{card.name}-{card.version}-{concept.concept}.png"
            if concept.grid:  # else the page shows "image missing" where it would be
                shutil.copyfile(folder / concept.grid, out / grid)
            entries.append(GalleryEntry(model=card.ref, concept=concept.concept, grid=grid,
                                        metrics=concept.metrics, base_metrics=concept.base_metrics,
                                        note=f"base: {evaluation.base_model}; evaluated "
                                             f"{evaluation.evaluated_at}, {evaluation.config.images} "
                                             "images per prompt"))
    return write_gallery(out, entries, title=title)
