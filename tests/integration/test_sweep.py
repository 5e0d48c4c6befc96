"""`atelier sweep` for real: a Ray Tune search of DreamBooth trials on the embedded stack, the
best trial per concept registered with its lineage, results and plots in S3."""

from __future__ import annotations

import os
import signal

import pytest
import yaml

from atelier.bench.faults import WORKER_PID, job_events, wait_for_durable_checkpoint
from atelier.rayjobs import Jobs
from atelier.registry import Registry
from atelier.storage import Storage
from atelier.training.sweep import Promotion, SweepConfig, read_results, submit_sweep

pytestmark = pytest.mark.integration


def test_a_sweep_over_two_settings_and_two_concepts_registers_the_best_of_each(env, concepts_file,
                                                                              tmp_path, capsys):
    from atelier.catalogue.schema import ConceptsFile
    from atelier.cli.main import main

    cluster = env
    names = [c.name for c in ConceptsFile.load(concepts_file).concepts[:2]]
    sweep = SweepConfig(metric="clip_i", early_stopping=None, train={
        "base_model": "shop", "eval_encoder": "shop-clip", "eval_images": 2, "model_name": "swept",
        "max_train_steps": 20, "checkpoint_every": 10, "validation_steps": 2,
        "learning_rate": {"grid": [1e-5, 1e-3]}})
    job_id, spec = submit_sweep(cluster, concepts_file, sweep, concepts=names, name="sweep-test",
                                promote=Promotion(alias="prod"))
    jobs = Jobs(cluster)
    status = jobs.wait(job_id, timeout_s=900)
    if status != "SUCCEEDED":
        print(jobs.logs(job_id)[-8000:])
    assert status == "SUCCEEDED"

    results, _ = read_results(cluster, "sweep-test")
    assert sorted((t.concept, t.settings["learning_rate"]) for t in results.trials) == sorted(
        (n, lr) for n in names for lr in (1e-5, 1e-3))
    assert all(t.error is None and t.steps == 20 and [p["step"] for p in t.curve] == [10, 20]
               and t.final is not None for t in results.trials)
    registry = Registry(Storage(cluster))
    for concept in names:
        ref = results.best[concept]
        _, card = registry.get(ref)
        winner = next(t for t in results.trials
                      if t.concept == concept and t.trial == results.best_trial[concept])
        assert card.lineage == {"sweep": "sweep-test", "trial": winner.trial, "metric": "clip_i",
                                "value": winner.final}
        assert card.hyperparameters["learning_rate"] == winner.settings["learning_rate"]
        rivals = [t.final for t in results.trials if t.concept == concept]
        assert winner.final == max(rivals)
        assert registry.get(f"{card.name}@prod")[1].version == card.version  # promoted

    capsys.readouterr()
    assert main(["sweep", "status", job_id]) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and out.count(" done ") >= 4, out
    assert all(f"registered: {results.best[n]}" in out and f"@prod -> {results.best[n]}" in out for n in names)
    assert main(["sweep", "show", "sweep-test", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "best" in out and all(f"best for {n}" in out for n in names)
    for plot in ("curves.png", "pareto.png"):
        assert (tmp_path / "out" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((tmp_path / "out" / "results.json").read_text())["name"] == "sweep-test"


def test_a_killed_trial_resumes_from_its_last_checkpoint_and_completes_its_curve(env, concepts_file):
    """A trial is a Ray Train run like any training job: its worker is killed after the first
    durable checkpoint, a new worker resumes from it, and the trial's curve has every checkpoint."""
    from atelier.catalogue.schema import ConceptsFile
    from atelier.training.events import Resumed, Trial
    from atelier_jobs.sweep import trial_key

    cluster = env
    name = ConceptsFile.load(concepts_file).concepts[3].name
    sweep = SweepConfig(metric="clip_i", early_stopping=None, train={
        "base_model": "shop", "eval_encoder": "shop-clip", "eval_images": 2, "model_name": "sweep-killed",
        "max_train_steps": 90, "checkpoint_every": 30, "validation_steps": 2, "max_failures": 1,
        "learning_rate": {"grid": [1e-4]}})
    job_id, spec = submit_sweep(cluster, concepts_file, sweep, concepts=[name], name="sweep-kill")
    jobs = Jobs(cluster)
    first = wait_for_durable_checkpoint(cluster, f"sweep-kill-{trial_key({'learning_rate': 1e-4})}",
                                        timeout_s=400)
    pids = {int(m) for m in WORKER_PID.findall(jobs.logs(job_id))}
    assert pids, "no Ray Train worker seen in the logs"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # the trial's worker process dies mid-run
    status = jobs.wait(job_id, timeout_s=600)
    if status != "SUCCEEDED":
        print(jobs.logs(job_id)[-8000:])
    assert status == "SUCCEEDED"

    resumed = job_events(jobs, job_id, Resumed)
    assert resumed and all(first <= r.step < 90 for r in resumed), resumed
    (trial,) = read_results(cluster, "sweep-kill")[0].trials
    assert trial.error is None and trial.steps == 90 and not trial.stopped_early
    assert [p["step"] for p in trial.curve] == [30, 60, 90], trial.curve
    assert [e.state for e in job_events(jobs, job_id, Trial)][-1] == "done"
    assert [c.ref for c in Registry(Storage(cluster)).list(f"sweep-killed-{name}")] == [f"sweep-killed-{name}:1"]
