"""Faults injected into the embedded stack, each by the process id of something the test started
(never by name): what the users of the endpoint saw, and what came back by itself."""

from __future__ import annotations

import base64
import os
import signal
import time
from types import SimpleNamespace

import pytest
import requests

from atelier.bench.faults import APP, Load, counter, request, running_replicas, serve_config
from atelier.endpoint.deploy import ServeCluster
from support import free_port

pytestmark = pytest.mark.integration

KEY = "fault-key"


@pytest.fixture(scope="module")
def app(serve, cluster, tiny_model, tmp_path_factory):
    """The serving application with the tiny model, deployed by `atelier serve up`; two copies
    of it registered (copy-a, copy-b)."""
    from atelier.registry import Registry
    from atelier.storage import Storage

    tmp = tmp_path_factory.mktemp("faults")
    registry = Registry(Storage(cluster))
    for name in ("copy-a", "copy-b"):
        registry.publish(tiny_model, name=name, method="full", base_model="tiny", concepts=[],
                         hyperparameters={}, dataset_sha256="0" * 64)
    keys = tmp / "api-keys"
    keys.write_text(f"{KEY}\n")
    port = free_port()
    with serve(serve_config(port, str(keys))):
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", cluster=ServeCluster(cluster),
                              settings=cluster, auth={"Authorization": f"Bearer {KEY}"})


def generation(app, model: str, timeout: float = 120) -> requests.Response:
    return requests.post(f"{app.url}/v1/images/generations", json=request(model, seed=3), headers=app.auth,
                         timeout=timeout)


def load(app) -> Load:
    """Two clients sending the same generation without pause."""
    return Load(app.url, KEY, request("tiny", seed=11))


def test_killing_the_model_replica_under_load_fails_no_request(app):
    """SIGKILL the model replica's process while two clients send requests without pause: the
    ingress sends the requests it held to the replica Serve starts instead, so every request is
    answered 200, with the image its seed fixes."""
    (replica,) = running_replicas(app.cluster, APP)
    metrics = f"http://127.0.0.1:{app.settings.stack.metrics_port}/metrics"
    retried_before = counter(metrics, "ray_atelier_replica_retries")
    with load(app) as clients:
        clients.wait_for(6, since=0)
        killed = time.monotonic()
        os.kill(replica["pid"], signal.SIGKILL)
        clients.wait_for(6, since=killed)
    seen = clients.figures(killed)
    new = running_replicas(app.cluster, APP)
    print(f"replica killed: {seen}; replica pid {replica['pid']} -> {[r['pid'] for r in new]}")
    assert seen.failed == 0, [a for a in clients.answers if a.status != 200]
    assert seen.in_flight, "no request was in flight when the replica died"
    assert seen.images == 1, "the same seed gave another image"
    assert base64.b64decode(clients.answers[0].body)[:8] == b"\x89PNG\r\n\x1a\n"
    assert new and all(r["pid"] != replica["pid"] for r in new)  # Serve replaced it
    # The ingress retried them (the counter is exported every few seconds).
    deadline = time.monotonic() + 30
    while counter(metrics, "ray_atelier_replica_retries") <= retried_before and time.monotonic() < deadline:
        time.sleep(1)
    assert counter(metrics, "ray_atelier_replica_retries") > retried_before


def test_a_storage_outage_during_a_model_load_is_a_503_that_says_why_and_ends_by_itself(app):
    """SIGKILL SeaweedFS while the replica must load a model from it: that request is a 503
    naming storage, with Retry-After; the model already in memory keeps serving; /readyz says
    storage is down; once SeaweedFS is back, the same request succeeds with no one's help."""
    from atelier import stack

    # copy-a is looked up (and cached by the ingress), then pushed out of the replica's two
    # model slots by copy-b and tiny: serving it again means loading it from S3.
    for model in ("copy-a", "copy-b", "tiny"):
        assert generation(app, model).status_code == 200
    weed = stack.status(app.settings).service("seaweedfs")
    assert weed.running and weed.pid
    os.kill(weed.pid, signal.SIGKILL)
    try:
        down = generation(app, "copy-a")
        assert down.status_code == 503, down.text
        assert down.headers.get("Retry-After") == "2"
        error = down.json()["error"]
        assert error["type"] == "StorageUnavailable" and "S3" in error["message"], error
        assert generation(app, "tiny").status_code == 200  # what is loaded still serves
        deadline = time.monotonic() + 90  # readiness is cached as long as lookups are
        while (ready := requests.get(f"{app.url}/readyz", timeout=30)).status_code == 200:
            assert time.monotonic() < deadline, "/readyz still says ready"
            time.sleep(2)
        assert ready.status_code == 503 and "S3" in ready.text, ready.text
    finally:
        stack.up(app.settings)  # SeaweedFS again, on its data
    restarted = time.monotonic()
    deadline = restarted + 120
    while (again := generation(app, "copy-a")).status_code != 200:
        assert again.status_code == 503 and time.monotonic() < deadline, again.text
        time.sleep(1)
    print(f"storage outage: the load came back {time.monotonic() - restarted:.1f} s after SeaweedFS did")
    assert stack.status(app.settings).service("seaweedfs").pid != weed.pid


def test_a_storage_outage_during_training_resumes_from_the_last_durable_checkpoint(cluster, concepts_file):
    """SIGKILL SeaweedFS after a training job's first durable checkpoint and start it again 10 s
    later. Whatever met the outage first (a worker writing a checkpoint, or Ray Train's controller
    writing its snapshot, which Ray Train does not retry), the run fails; the job waits for S3
    and starts the run again, which resumes from its last checkpoint in S3, and the job ends with
    one registered model. max_failures 0, so that Ray Train's own worker restarts (tested in
    test_training) cannot absorb the outage and the job's restart is what is under test."""
    from atelier import stack
    from atelier.bench.faults import job_events, wait_for_durable_checkpoint
    from atelier.catalogue.schema import ConceptsFile
    from atelier.rayjobs import Jobs
    from atelier.registry import Registry
    from atelier.storage import Storage
    from atelier.training import events
    from atelier.training.config import TrainConfig
    from atelier.training.progress import progress
    from atelier.training.submit import submit

    name = ConceptsFile.load(concepts_file).concepts[5].name
    # Checkpoints every 20 steps: an outage of 10 s meets at least one checkpoint write.
    cfg = TrainConfig(max_train_steps=300, checkpoint_every=20, learning_rate=1e-5, validation_steps=2,
                      max_failures=0, model_name="outage")
    jobs = Jobs(cluster)
    job_id, spec = submit(cluster, concepts_file, cfg, concepts=[name])
    durable = wait_for_durable_checkpoint(cluster, spec.run_name)
    weed = stack.status(cluster).service("seaweedfs")
    steps = job_events(jobs, job_id, events.Step)
    at_kill = steps[-1].step if steps else durable
    os.kill(weed.pid, signal.SIGKILL)
    time.sleep(10)
    stack.up(cluster)
    status = jobs.wait(job_id, timeout_s=600)
    if status != "SUCCEEDED":
        print(jobs.logs(job_id)[-6000:])
    assert status == "SUCCEEDED"
    resumed = job_events(jobs, job_id, events.Resumed)
    assert resumed and all(durable <= r.step < cfg.max_train_steps for r in resumed), resumed
    outages = job_events(jobs, job_id, events.StorageOutage)
    p = progress(jobs, job_id)
    assert outages and p.outages == len(outages), "the run was not started again after the outage"
    assert p.status == "SUCCEEDED" and p.resumed_from == resumed[-1].step
    recomputed = max(0, at_kill - min(r.step for r in resumed))
    print(f"storage outage in training: killed near step {at_kill}, resumed from {[r.step for r in resumed]}, "
          f"about {recomputed} steps recomputed; the run was started again {len(outages)} times "
          f"({[o.waited_s for o in outages]} s waited)")
    assert [c.ref for c in Registry(Storage(cluster)).list(f"outage-{name}")] == [f"outage-{name}:1"]

