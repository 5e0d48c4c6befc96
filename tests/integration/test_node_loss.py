"""A lost Ray node during training: a second node, started by the test, holds the run's worker
and is killed (every process of it, by pid). In a module of its own so that no Serve application
is up meanwhile: Serve would start an HTTP proxy on the second node too."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def test_losing_the_node_of_a_training_worker_resumes_the_run_on_what_remains(env, concepts_file, capsys):
    """A second Ray node joins the session's head, whose CPUs are held meanwhile, so the run's
    worker lands on it. After the run's first durable checkpoint the head's CPUs are freed and
    the second node's every process is SIGKILLed (a lost machine). Ray Train starts the worker
    again on the head, which resumes from that checkpoint; the job registers one model, and
    `atelier train status` says that a worker failed with its node."""
    from atelier.bench.faults import WORKER_PID, SecondNode, job_events, wait_for_durable_checkpoint
    from atelier.catalogue.schema import ConceptsFile
    from atelier.cli.main import main
    from atelier.rayjobs import Jobs
    from atelier.registry import Registry
    from atelier.storage import Storage
    from atelier.training import events
    from atelier.training.config import TrainConfig
    from atelier.training.progress import progress
    from atelier.training.submit import submit

    cluster = env
    name = ConceptsFile.load(concepts_file).concepts[6].name
    # Steps enough that the job outlives Ray's verdict on the node (tens of seconds after it).
    cfg = TrainConfig(max_train_steps=300, checkpoint_every=20, learning_rate=1e-5, validation_steps=2,
                      max_failures=2, model_name="node-lost")
    jobs = Jobs(cluster)
    with SecondNode(cluster, num_cpus=1) as node:
        job_id, spec = submit(cluster, concepts_file, cfg, concepts=[name])
        durable = wait_for_durable_checkpoint(cluster, spec.run_name)
        workers = {int(pid) for pid in WORKER_PID.findall(jobs.logs(job_id))}
        assert workers and workers <= set(node.pids()), "the run's worker is not on the second node"
        node.release_head()
        steps = job_events(jobs, job_id, events.Step)
        at_kill = steps[-1].step if steps else durable
        killed = node.kill()
        lost = time.monotonic()
        status = jobs.wait(job_id, timeout_s=600)
    if status != "SUCCEEDED":
        print(jobs.logs(job_id)[-6000:])
    assert status == "SUCCEEDED"
    assert workers <= set(killed)
    resumed = job_events(jobs, job_id, events.Resumed)
    assert resumed and all(durable <= r.step < cfg.max_train_steps for r in resumed), resumed
    failed = job_events(jobs, job_id, events.WorkersFailed)
    p = progress(jobs, job_id)
    with capsys.disabled():
        print(f"node lost in training: killed near step {at_kill}, resumed from {[r.step for r in resumed]}, "
              f"about {max(0, at_kill - resumed[0].step)} steps recomputed; {len(failed)} failure(s): "
              f"{[f.error for f in failed]}; the job ended {time.monotonic() - lost:.0f} s after the loss")
    assert failed and p.worker_failures == len(failed) and p.last_failure == failed[-1].error, failed
    assert p.nodes_lost == ["127.0.0.1"], "the job did not say that the node was lost"
    capsys.readouterr()
    assert main(["train", "status", job_id]) == 0
    shown = capsys.readouterr().out
    assert "worker failures" in shown and "nodes lost" in shown and "127.0.0.1" in shown, shown
    assert p.status == "SUCCEEDED" and p.resumed_from == resumed[-1].step
    assert [c.ref for c in Registry(Storage(cluster)).list(f"node-lost-{name}")] == [f"node-lost-{name}:1"]
