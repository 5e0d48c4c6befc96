"""Ray job: a sweep (`atelier sweep run`): per concept, a Ray Tune search over training settings.

    python -m atelier_jobs.sweep --spec '<SweepSpec JSON>'

Each trial is a Ray Train run of the DreamBooth loop (the training job's own `fit`) with the
trial's settings, measured at every checkpoint (eval_encoder); Ray Tune reads those reports
(TuneReportCallback) and ASHA stops the trials that fall behind. A trial's Ray Train run is named
after its settings, so a killed trial, or a resubmitted sweep, resumes from its last checkpoint
like any training job. When a concept's search ends, its best finished trial is published to the
registry with its lineage, and the sweep's results (a table, plots) are committed to
`sweeps/<name>/`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ray

from atelier.catalogue.schema import ConceptsFile
from atelier.errors import AtelierError
from atelier.storage import Storage
from atelier.training import events
from atelier.training.config import TrainConfig
from atelier.training.spec import ModelRun
from atelier.training.sweep import SweepResults, SweepSpec, TrialResult
from atelier_jobs import train

METRIC_PREFIX = "quality_"  # how the DreamBooth loop reports checkpoint quality to Ray Train


def trial_key(settings: dict[str, Any]) -> str:
    """A trial's name from its settings: the same settings, the same Ray Train run."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def trial_run(run: ModelRun, settings: dict[str, Any]) -> ModelRun:
    """The concept's run with a trial's settings in its config, named after them."""
    config = TrainConfig.model_validate(run.config.model_dump() | settings)
    return run.model_copy(update={"config": config, "run_name": f"{run.run_name}-{trial_key(settings)}"})


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune's function trainable: one trial, as a Ray Train run whose reports reach Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    run = trial_run(ModelRun.model_validate(config["run"]), config["settings"])
    train.fit_through_outages(Storage(), run, callbacks=[TuneReportCallback()])


def announcer(concept: str, metric: str, max_steps: int):
    """A Tune callback that prints each trial's checkpoints and end as Trial events, which
    `atelier sweep status` reads from the job's log while the search runs."""
    from ray import tune

    def announce(trial, state: str, result: dict | None) -> None:
        result = result or {}
        settings = trial.config["settings"]
        value = result.get(METRIC_PREFIX + metric)
        events.emit(events.Trial(concept=concept, trial=trial_key(settings), settings=settings, state=state,
                                 step=result.get("step"), metric=metric,
                                 value=None if value is None else float(value)))

    class Announce(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            announce(trial, "running", result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            steps = int(trial.config["settings"].get("max_train_steps", max_steps))
            done = (trial.last_result or {}).get("step", 0) >= steps
            announce(trial, "done" if done else "stopped", trial.last_result)

        def on_trial_error(self, iteration, trials, trial, **info):
            announce(trial, "failed", trial.last_result)

    return Announce()


def search(storage: Storage, spec: SweepSpec, run: ModelRun):
    """One concept's Ray Tune search; its ResultGrid."""
    import pyarrow.fs as pafs
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sweep = spec.sweep
    _, spaces = sweep.split()
    cfg = run.config
    per_trial = cfg.num_workers * (1 if cfg.use_gpu else cfg.cpus_per_worker)
    available = ray.cluster_resources().get("GPU" if cfg.use_gpu else "CPU", 1)
    concurrent = sweep.max_concurrent or max(1, int(available // per_trial))
    scheduler = None
    if sweep.early_stopping:
        scheduler = ASHAScheduler(time_attr="step", max_t=max(_all_steps(spec)),
                                  grace_period=sweep.early_stopping.grace_steps,
                                  reduction_factor=sweep.early_stopping.reduction_factor)
    settings = {name: space.to_tune() for name, space in spaces.items()}
    if sweep.samples > 1:
        # Repeats are seeds: each its own trial, named (and resumed) by its settings.
        settings["seed"] = tune.grid_search([cfg.seed + i for i in range(sweep.samples)])
    _, runs_path = storage.resolve(storage.uri("runs"))
    tuner = tune.Tuner(
        # The trial function only waits on its Ray Train run, whose workers hold the resources;
        # Tune needs some request to place it, so a sliver of a CPU.
        tune.with_resources(run_trial, {"CPU": 0.01}),
        param_space={"run": run.model_dump(mode="json"), "settings": settings},
        tune_config=tune.TuneConfig(
            metric=METRIC_PREFIX + sweep.metric, mode=sweep.mode, num_samples=1,
            scheduler=scheduler, max_concurrent_trials=concurrent,
            search_alg=BasicVariantGenerator(random_state=cfg.seed)),
        run_config=tune.RunConfig(name=run.run_name, storage_path=runs_path,
                                  callbacks=[announcer(run.concepts[0], sweep.metric, cfg.max_train_steps)],
                                  storage_filesystem=pafs.S3FileSystem(**storage.s3_options())),
    )
    return tuner.fit()


def _all_steps(spec: SweepSpec) -> list[int]:
    _, spaces = spec.sweep.split()
    steps = spaces.get("max_train_steps")
    return [int(s) for s in steps.candidates()] if steps else [spec.job.config.max_train_steps]


def collect(concept: str, grid, metric: str, price_per_hour: float | None) -> list[TrialResult]:
    """Each trial of a ResultGrid as a TrialResult."""
    out = []
    for result in grid:
        settings = result.config["settings"]
        history = result.metrics_dataframe
        rows = [] if history is None else history.to_dict("records")
        # A step reported twice (a trial's worker died after reporting it and resumed from an
        # earlier checkpoint) is the same training state twice: its latest report stands.
        by_step = {int(r["step"]): {k[len(METRIC_PREFIX):]: r.get(k) for k in r if str(k).startswith(METRIC_PREFIX)}
                   for r in rows if r.get("step") is not None}
        curve = [{"step": step, **metrics} for step, metrics in sorted(by_step.items())]
        seconds = loop_seconds(rows)
        steps = curve[-1]["step"] if curve else 0
        max_steps = int(settings.get("max_train_steps", result.config["run"]["config"]["max_train_steps"]))
        out.append(TrialResult(
            concept=concept, trial=trial_key(settings), settings=settings, curve=curve,
            steps=int(steps), stopped_early=bool(curve) and steps < max_steps and result.error is None,
            seconds=round(seconds, 2), steps_per_s=round(steps / seconds, 3) if seconds else None,
            cost_usd=round(seconds / 3600 * price_per_hour, 6) if price_per_hour and seconds else None,
            final=curve[-1].get(metric) if curve else None,
            error=None if result.error is None else type(result.error).__name__ + ": " + str(result.error)[:200],
        ))
    return out


def loop_seconds(rows: list[dict[str, Any]]) -> float:
    """The seconds a trial's training loop ran, from its reports' loop_s: a worker that restarted
    begins again from 0, so each run of the loop counts up to its last report. Start-up and time
    spent waiting for a free worker are not charged (Tune's time_total_s would charge them)."""
    total = last = 0.0
    for row in rows:
        now = float(row.get("loop_s") or 0.0)
        if math.isnan(now):  # a row that is not a checkpoint report
            continue
        if now < last:  # a new worker resumed the trial
            total += last
        last = now
    return total + last


def best_trial(trials: list[TrialResult], mode: str) -> TrialResult | None:
    """The finished trial with the best final metric (a trial ASHA stopped never wins: its
    model is not the one its settings would make)."""
    finished = [t for t in trials if t.error is None and not t.stopped_early and t.final is not None]
    if not finished:
        return None
    return (max if mode == "max" else min)(finished, key=lambda t: t.final or 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="SweepSpec as JSON")
    spec = SweepSpec.model_validate_json(parser.parse_args(argv).spec)
    import pyarrow.fs as pafs
    import ray.train

    ray.init(log_to_driver=True)
    storage = Storage()
    concepts = ConceptsFile.load(storage.fetch_cached(spec.job.dataset_uri) / "concepts.yaml")
    runs = train.plan(spec.job, concepts)
    events.emit(events.Plan(models=[r.model_name for r in runs]))
    price = _price(spec.job.config)
    trials: list[TrialResult] = []
    best: dict[str, str] = {}
    best_trials: dict[str, str] = {}
    for run in runs:
        concept = run.concepts[0]
        grid = search(storage, spec, run)
        found = collect(concept, grid, spec.sweep.metric, price)
        trials += found
        winner = best_trial(found, spec.sweep.mode)
        if winner is None:
            continue
        result = next(r for r in grid if trial_key(r.config["settings"]) == winner.trial)
        # Tune holds the path of the trial's last checkpoint (Ray Train wrote it to S3).
        final = SimpleNamespace(checkpoint=ray.train.Checkpoint(
            path=result.metrics["checkpoint_path"],
            filesystem=pafs.S3FileSystem(**storage.s3_options())))
        uri, card = train.publish(storage, trial_run(run, winner.settings), spec.job, concepts, final,
                                  lineage={"sweep": spec.job.run_name, "trial": winner.trial,
                                           "metric": spec.sweep.metric, "value": winner.final})
        best[concept], best_trials[concept] = card.ref, winner.trial
        events.emit(events.Published(model=card.ref, uri=uri, loss=card.final_loss))
        if spec.promote:
            promote(storage, spec, card.ref, winner)
    results = SweepResults(name=spec.job.run_name, metric=spec.sweep.metric, mode=spec.sweep.mode,
                           config=spec.sweep, trials=trials, best=best, best_trial=best_trials)
    commit_results(storage, results)
    return 0


def promote(storage: Storage, spec: SweepSpec, ref: str, winner: TrialResult) -> None:
    """Move the alias to the concept's best model, through the gate if there is one; a gate
    that says no is reported, not raised: the model stays registered, the alias where it was."""
    from atelier import promotion
    from atelier.errors import GateRefused
    from atelier.registry import Registry

    assert spec.promote is not None
    if spec.promote.promote_if:  # the gate reads the model's evaluation: make it, as `atelier eval` would
        from atelier.quality.results import EvalConfig, EvalSpec
        from atelier_jobs.evaluate import evaluate

        config = EvalConfig(clip_encoder=spec.job.config.eval_encoder)
        ray.get(evaluate.remote(EvalSpec(model=ref, config=config).model_dump_json()))
    try:
        move, webhook = promotion.promote(
            Registry(storage), ref, spec.promote.alias, promote_if=spec.promote.promote_if,
            note=f"sweep {spec.job.run_name}, trial {winner.trial}", webhook=spec.promote.webhook)
    except GateRefused as e:
        events.emit(events.Promoted(model=ref, alias=spec.promote.alias, moved=False, why=str(e)))
        return
    events.emit(events.Promoted(model=ref, alias=move.alias, moved=True, previous=move.previous,
                                webhook=webhook))


def commit_results(storage: Storage, results: SweepResults) -> str:
    """results.json and the plots, committed to sweeps/<name>/."""
    from atelier.training.sweep import write_plots

    uri = storage.uri("sweeps", results.name)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results.json").write_text(results.model_dump_json(indent=2))
        write_plots(results, Path(tmp))
        storage.commit(tmp, uri, {"kind": "sweep", "name": results.name}, overwrite=True)
    return uri


def _price(cfg: TrainConfig) -> float | None:
    """USD per hour of the trial's workers, from the bench's price catalogue; None on CPU or
    where the catalogue does not price the pool (cost is then left out, never guessed)."""
    from atelier.bench.cost import Catalogue

    if not cfg.use_gpu or not cfg.gpu_type:
        return None
    try:
        per_gpu = Catalogue.load().price(cfg.gpu_type).usd_per_gpu_hour
    except AtelierError:
        return None
    return None if per_gpu is None else per_gpu * cfg.num_workers


if __name__ == "__main__":
    sys.exit(main())
