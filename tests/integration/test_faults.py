"""Faults injected into the embedded stack, each by the process id of something the test started
(never by name): what the users of the endpoint saw, and what came back by itself."""

from __future__ import annotations

import base64
import os
import signal
import statistics
import threading
import time
from types import SimpleNamespace

import pytest
import requests
import yaml

from atelier.endpoint.deploy import ServeCluster
from support import free_port

pytestmark = pytest.mark.integration

NAME = "atelier-faults"
KEY = "fault-key"
# One model replica, so a killed one must be restarted (and its model loaded) before anything
# answers: the longest wait the ingress's retries have to cover.
CONFIG = {
    "name": NAME,
    "limits": {"max_images": 1, "max_steps": 10, "min_side": 32, "max_width": 64, "max_height": 64},
    "defaults": {"steps": 2},
    "pools": {"cpu": {
        "num_cpus": 0.5, "max_ongoing_requests": 4, "max_queued_requests": 16,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        # Batches of one: a batch of two computes in another order on a CPU and may round a
        # pixel differently, and this test compares images byte for byte across the kill.
        "replica": {"max_batch_images": 1, "max_models": 2},
    }},
    # Lookups kept 60 s: the storage test needs the ingress to know a model the replica has not
    # loaded when storage goes down, so that the load, not the lookup, meets the outage.
    "ingress": {"num_cpus": 0.1, "registry_cache_s": 60, "replica_retries": 8, "replica_retry_s": 90},
    "http": {"retry_after_s": 2},
}


@pytest.fixture(scope="module")
def app(cluster, tiny_model, tmp_path_factory):
    """The serving application with the tiny model, deployed by `atelier serve up`; two copies
    of it registered (copy-a, copy-b)."""
    from atelier.cli.main import main
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
    config = {**CONFIG, "auth": {"api_keys_file": str(keys)}, "http": {**CONFIG["http"], "port": port}}
    (tmp / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {"ATELIER_HOME": str(cluster.home)} | {
        f"ATELIER_STACK__{k.upper()}": str(v) for k, v in cluster.stack.model_dump().items() if v is not None}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["serve", "up", "--config", str(tmp / "serve.yaml"), "--model", "tiny"]) == 0
        try:
            yield SimpleNamespace(url=f"http://127.0.0.1:{port}", cluster=ServeCluster(cluster),
                                  settings=cluster, auth={"Authorization": f"Bearer {KEY}"})
        finally:
            assert main(["serve", "down"]) == 0


def generation(app, model: str, timeout: float = 120) -> requests.Response:
    body = {"prompt": "photo of a ring", "model": model, "seed": 3, "steps": 2, "width": 32, "height": 32}
    return requests.post(f"{app.url}/v1/images/generations", json=body, headers=app.auth, timeout=timeout)


def model_replicas(app) -> list[dict]:
    """The model deployment's running replicas as Serve reports them (with their pids)."""
    deployments = (app.cluster.application(NAME) or {}).get("deployments") or {}
    replicas = (deployments.get("StableDiffusion") or {}).get("replicas") or []
    return [r for r in replicas if r["state"] == "RUNNING"]


def metric(app, name: str) -> float:
    """A counter's total over its labels, from the node's metrics port (0 until exported)."""
    text = requests.get(f"http://127.0.0.1:{app.settings.stack.metrics_port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


class Clients:
    """Clients that send the same generation (one seed) without pause, each logging
    (sent at, seconds, status, Retry-After, image or error)."""

    def __init__(self, app, count: int = 2):
        self.app, self.stop = app, threading.Event()
        self.logs: list[list[tuple[float, float, int, str | None, str]]] = [[] for _ in range(count)]
        self.threads = [threading.Thread(target=self._run, args=(log,), daemon=True) for log in self.logs]

    def _run(self, log) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                r = generation(self.app, "tiny", timeout=180)
                status, retry_after = r.status_code, r.headers.get("Retry-After")
                answer = r.json()["data"][0]["b64_json"] if status == 200 else r.text
            except requests.RequestException as e:  # the connection itself failed: as bad as a 500
                status, retry_after, answer = 0, None, repr(e)
            log.append((sent, time.monotonic() - sent, status, retry_after, answer))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=200)

    @property
    def every(self):
        return sorted(entry for log in self.logs for entry in log)

    def wait_for(self, successes: int, since: float, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(1 for sent, _, status, _, _ in self.every if sent > since and status == 200) >= successes:
                return
            time.sleep(0.2)
        raise AssertionError(f"not {successes} answers within {timeout_s} s: {self.every[-6:]}")


def test_killing_the_model_replica_under_load_fails_no_request(app):
    """SIGKILL the model replica's process while two clients send requests without pause: the
    ingress sends the requests it held to the replica Serve starts instead, so every request is
    answered 200, with the image its seed fixes."""
    (replica,) = model_replicas(app)
    retried_before = metric(app, "ray_atelier_replica_retries")
    with Clients(app) as clients:
        clients.wait_for(6, since=0)
        killed = time.monotonic()
        os.kill(replica["pid"], signal.SIGKILL)
        clients.wait_for(6, since=killed)
    every = clients.every
    failed = [(status, answer[:200]) for _, _, status, _, answer in every if status != 200]
    before = [seconds for sent, seconds, _, _, _ in every if sent + seconds < killed]
    spanning = [seconds for sent, seconds, _, _, _ in every if sent < killed < sent + seconds]
    added = max(spanning, default=0.0) - statistics.median(before)
    new = model_replicas(app)
    print(f"replica killed: {len(every)} requests, {len(failed)} failed, {len(spanning)} in flight at "
          f"the kill, longest added latency {added:.1f} s; replica pid {replica['pid']} -> "
          f"{[r['pid'] for r in new]}")
    assert not failed, failed
    assert spanning, "no request was in flight when the replica died"
    assert len({answer for *_, answer in every}) == 1, "the same seed gave another image"
    assert base64.b64decode(every[0][4])[:8] == b"\x89PNG\r\n\x1a\n"
    assert new and all(r["pid"] != replica["pid"] for r in new)  # Serve replaced it
    # The ingress retried them (the counter is exported every few seconds).
    deadline = time.monotonic() + 30
    while metric(app, "ray_atelier_replica_retries") <= retried_before and time.monotonic() < deadline:
        time.sleep(1)
    assert metric(app, "ray_atelier_replica_retries") > retried_before


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
    from atelier.catalogue.schema import ConceptsFile
    from atelier.rayjobs import Jobs
    from atelier.registry import Registry
    from atelier.storage import Storage
    from atelier.training import events
    from atelier.training.config import TrainConfig
    from atelier.training.progress import progress
    from atelier.training.submit import submit
    from support import job_events, wait_for_durable_checkpoint

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
