"""What each fault costs, on a private embedded stack (SeaweedFS + Ray head on free ports, state
in a temporary folder, stopped at the end). Faults are injected by the pid of a process this
script started:

- replica: SIGKILL the only model replica while two clients send requests without pause;
- storage-load: SIGKILL SeaweedFS, ask for a model the replica must load from it, start
  SeaweedFS again (the clients keep asking for the model already loaded meanwhile);
- storage-train: SIGKILL SeaweedFS for 10 s after a training job's first durable checkpoint;
- storage-publish: SIGKILL SeaweedFS for 10 s after a publication's first file is uploaded;
- node-train: SIGKILL every process of a second Ray node, which holds a training run's worker,
  after the run's first durable checkpoint.

Per fault: requests sent, failed, retried by the ingress, the longest latency added to a request,
training steps recomputed, and the time to recover.

    .venv/bin/python benchmarks/faults.py [--outage-s 10]
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

KEY = "benchmark-key"


def wait(check, timeout_s: float, what: str):
    from atelier.waiting import wait_until

    return wait_until(check, timeout_s=timeout_s, interval_s=0.2, what=what)


def replica_fault(settings, url: str) -> dict:
    from atelier.bench.faults import APP, Load, counter, request, running_replicas
    from atelier.endpoint.deploy import ServeCluster

    cluster = ServeCluster(settings)
    metrics = f"http://127.0.0.1:{settings.stack.metrics_port}/metrics"
    retried = counter(metrics, "ray_atelier_replica_retries")
    (replica,) = running_replicas(cluster, APP)
    with Load(url, KEY, request("tiny", seed=11)) as load:
        load.wait_for(6, since=0)
        killed = time.monotonic()
        os.kill(replica["pid"], signal.SIGKILL)
        wait(lambda: any(r["pid"] != replica["pid"] for r in running_replicas(cluster, APP)), 180,
             "a new model replica")
        recovered = time.monotonic() - killed
        load.wait_for(6, since=killed)
    seen = load.figures(killed)
    time.sleep(12)  # Ray exports counters every few seconds
    return {"fault": "model replica killed", "requests": seen.requests, "failed": seen.failed,
            "retried": int(counter(metrics, "ray_atelier_replica_retries") - retried),
            "added_s": seen.added_latency_s, "steps_recomputed": "-", "recover_s": round(recovered, 1),
            "note": f"{seen.in_flight} in flight; {seen.images} distinct image(s) for the one seed"}


def storage_load_fault(settings, url: str, outage_s: float) -> dict:
    import requests

    from atelier import stack
    from atelier.bench.faults import Load, request

    def ask(model: str) -> requests.Response:
        return requests.post(f"{url}/v1/images/generations", json=request(model, seed=3),
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=120)

    for model in ("copy-a", "copy-b", "tiny"):  # copy-a known to the ingress, not in the replica
        assert ask(model).status_code == 200
    weed = stack.status(settings).service("seaweedfs")
    with Load(url, KEY, request("tiny", seed=5)) as load:
        load.wait_for(3, since=0)
        killed = time.monotonic()
        os.kill(weed.pid, signal.SIGKILL)
        down = ask("copy-a")
        time.sleep(max(0.0, outage_s - (time.monotonic() - killed)))
        stack.up(settings)
        back = time.monotonic()
        wait(lambda: ask("copy-a").status_code == 200, 120, "the model to load again")
        recovered = time.monotonic() - back
    seen = load.figures(killed)
    return {"fault": f"S3 down {outage_s:g} s, during a model load", "requests": seen.requests + 1,
            "failed": seen.failed + (down.status_code != 200), "retried": 0, "added_s": seen.added_latency_s,
            "steps_recomputed": "-", "recover_s": round(recovered, 1),
            "note": f"the load: {down.status_code} Retry-After {down.headers.get('Retry-After')}; "
                    f"the loaded model: {seen.failed} of {seen.requests} failed"}


def storage_train_fault(settings, concepts: Path, concept: str, outage_s: float) -> dict:
    from atelier import stack
    from atelier.bench.faults import job_events, wait_for_durable_checkpoint
    from atelier.rayjobs import Jobs
    from atelier.training import events
    from atelier.training.config import TrainConfig
    from atelier.training.submit import submit

    cfg = TrainConfig(max_train_steps=300, checkpoint_every=20, learning_rate=1e-5, validation_steps=2,
                      max_failures=2, model_name="outage")
    jobs = Jobs(settings)
    job_id, spec = submit(settings, concepts, cfg, concepts=[concept])
    wait_for_durable_checkpoint(settings, spec.run_name, timeout_s=300)
    at_kill = max([s.step for s in job_events(jobs, job_id, events.Step)], default=0)
    weed = stack.status(settings).service("seaweedfs")
    os.kill(weed.pid, signal.SIGKILL)
    time.sleep(outage_s)
    stack.up(settings)
    recovered = past(jobs, job_id, at_kill)
    status = jobs.wait(job_id, timeout_s=900)
    resumed = job_events(jobs, job_id, events.Resumed)
    outages = job_events(jobs, job_id, events.StorageOutage)
    return {"fault": f"S3 down {outage_s:g} s, during training", "requests": "-",
            "failed": 0 if status == "SUCCEEDED" else 1, "retried": len(outages),
            "added_s": "-", "steps_recomputed": max(0, at_kill - min((r.step for r in resumed), default=at_kill)),
            "recover_s": round(recovered, 1),
            "note": f"job {status}; killed near step {at_kill}, resumed from {sorted({r.step for r in resumed})}; "
                    f"run restarted by the job {len(outages)}x, else by Ray Train"}


def past(jobs, job_id: str, step: int) -> float:
    """Seconds until the job's training is past `step` again, after a restart."""
    from atelier.bench.faults import job_events
    from atelier.training import events

    started = time.monotonic()
    wait(lambda: any(s.step > step for s in job_events(jobs, job_id, events.Step)[-3:])
         and job_events(jobs, job_id, events.Resumed), 600, "training to pass the step it was at")
    return time.monotonic() - started


def storage_publish_fault(settings, model: Path, outage_s: float) -> dict:
    import threading

    from atelier import stack
    from atelier.registry import Registry
    from atelier.storage import Outages, Storage

    registry = Registry(Storage(settings))
    started = time.monotonic()
    registry.publish(model, name="publish-calm", method="full", base_model="tiny", concepts=[],
                     hyperparameters={}, dataset_sha256="0" * 64)
    calm_s = time.monotonic() - started
    killed: list[float] = []
    restart = threading.Timer(outage_s, stack.up, args=(settings,))

    def outage_after_first_file(file: str, done: int, total: int) -> None:
        if not killed and done > total // 3:  # a third of the bytes are up
            killed.append(time.monotonic())
            os.kill(stack.status(settings).service("seaweedfs").pid, signal.SIGKILL)
            restart.start()

    waited: list[float] = []
    started = time.monotonic()
    try:
        _, card = registry.publish(model, name="publish-outage", method="full", base_model="tiny", concepts=[],
                                   hyperparameters={}, dataset_sha256="0" * 64, progress=outage_after_first_file,
                                   outages=Outages(registry.storage, wait_s=120,
                                                   on_wait=lambda error, s, n: waited.append(s)))
        outcome = card.ref
    except Exception as e:  # the figure to report, not to hide
        outcome = f"{type(e).__name__}: {e}"
    took = time.monotonic() - started
    if killed:
        restart.join()  # SeaweedFS runs again, for what follows
    versions = [c.ref for c in registry.list("publish-outage")]
    return {"fault": f"S3 down {outage_s:g} s, during a publication", "requests": "-",
            "failed": 0 if versions == ["publish-outage:1"] else 1, "retried": len(waited),
            "added_s": round(took - calm_s, 1), "steps_recomputed": "-",
            "recover_s": round(took - (killed[0] - started) - outage_s, 1) if killed else "-",
            "note": f"{outcome}; registered: {versions}; {calm_s:.1f} s without the fault"}


def node_train_fault(settings, concepts: Path, concept: str) -> dict:
    from atelier.bench.faults import WORKER_PID, SecondNode, job_events, wait_for_durable_checkpoint
    from atelier.rayjobs import Jobs
    from atelier.training import events
    from atelier.training.config import TrainConfig
    from atelier.training.submit import submit

    cfg = TrainConfig(max_train_steps=300, checkpoint_every=20, learning_rate=1e-5, validation_steps=2,
                      max_failures=2, model_name="node-lost")
    jobs = Jobs(settings)
    with SecondNode(settings, num_cpus=1) as node:
        job_id, spec = submit(settings, concepts, cfg, concepts=[concept])
        wait_for_durable_checkpoint(settings, spec.run_name, timeout_s=300)
        on_node = {int(p) for p in WORKER_PID.findall(jobs.logs(job_id))} <= set(node.pids())
        node.release_head()
        at_kill = max([s.step for s in job_events(jobs, job_id, events.Step)], default=0)
        node.kill()
        killed = time.monotonic()
        recovered = past(jobs, job_id, at_kill)
        wait(lambda: job_events(jobs, job_id, events.NodeLost), 120, "Ray to declare the node dead")
        declared = time.monotonic() - killed
        status = jobs.wait(job_id, timeout_s=900)
    resumed = job_events(jobs, job_id, events.Resumed)
    failed = job_events(jobs, job_id, events.WorkersFailed)
    return {"fault": "the Ray node of a training worker lost", "requests": "-",
            "failed": 0 if status == "SUCCEEDED" else 1, "retried": len(failed),
            "added_s": "-", "steps_recomputed": max(0, at_kill - min((r.step for r in resumed), default=at_kill)),
            "recover_s": round(recovered, 1),
            "note": f"job {status}; worker on the lost node: {on_node}; killed near step {at_kill}, resumed from "
                    f"{sorted({r.step for r in resumed})} on the head; Ray declared the node dead "
                    f"{declared:.0f} s after"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage-s", type=float, default=10.0, help="seconds SeaweedFS stays down")
    args = parser.parse_args()

    from atelier import stack
    from atelier.bench.faults import serve_config
    from atelier.catalogue.build import build_concepts
    from atelier.catalogue.synth import synth_shop
    from atelier.endpoint.config import ServeConfig
    from atelier.endpoint.deploy import ServeCluster, serve_up
    from atelier.models.builtin import build_model
    from atelier.models.libraries import quiet_libraries
    from atelier.models.tokenizer import build_clip_tokenizer
    from atelier.registry import Registry
    from atelier.settings import Settings, StackSettings
    from atelier.storage import Storage

    quiet_libraries()
    tmp = Path(tempfile.mkdtemp(prefix="atelier-faults-"))
    ports = stack.free_ports(spare=1)
    http_port = ports["s3_port"] + stack.SPARE_OFFSET
    settings = Settings(home=tmp / "home", stack=StackSettings(**ports, num_cpus=2))
    (tmp / "keys").write_text(KEY + "\n")
    url = f"http://127.0.0.1:{http_port}"
    stack.up(settings)
    rows = []
    try:
        registry = Registry(Storage(settings))
        tiny = build_model("tiny", tmp / "tiny")
        for name in ("copy-a", "copy-b"):
            registry.publish(tiny, name=name, method="full", base_model="tiny", concepts=[],
                             hyperparameters={}, dataset_sha256="0" * 64)
        config = ServeConfig.model_validate(serve_config(http_port, str(tmp / "keys")))
        serve_up(settings, config, ["tiny"], timeout_s=300)
        print("served", flush=True)
        rows.append(replica_fault(settings, url))
        print(rows[-1], flush=True)
        rows.append(storage_load_fault(settings, url, args.outage_s))
        print(rows[-1], flush=True)
        synth_shop(tmp / "shop")
        concepts, _ = build_concepts(tmp / "shop" / "catalogue.csv", tmp / "concepts.yaml", build_clip_tokenizer())
        rows.append(storage_train_fault(settings, tmp / "concepts.yaml", concepts.concepts[5].name, args.outage_s))
        print(rows[-1], flush=True)
        rows.append(storage_publish_fault(settings, tiny, args.outage_s))
        print(rows[-1], flush=True)
        # No Serve application while a second node exists: Serve would start an HTTP proxy on it.
        ServeCluster(settings).delete()
        rows.append(node_train_fault(settings, tmp / "concepts.yaml", concepts.concepts[6].name))
    finally:
        stack.down(settings)
    print()
    head = ["fault", "requests", "failed", "retried", "added_s", "steps_recomputed", "recover_s", "note"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in head) + " |")


if __name__ == "__main__":
    main()
