"""What a fault costs the endpoint's users: continuous load while something is killed, and the
figures of what they saw (benchmarks/faults.py prints them; tests/integration/test_faults.py
asserts on them). Faults are injected by the pid of a process the caller started, never by name.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from atelier import rayauth
from atelier.endpoint.deploy import ServeCluster
from atelier.errors import ServiceError
from atelier.settings import Settings
from atelier.waiting import wait_until

APP = "atelier-faults"


def serve_config(port: int, api_keys_file: str) -> dict:
    """The fault suite's application: one model replica, so a killed one must be restarted (and
    its model loaded) before anything answers, the longest wait the ingress's retries cover;
    batches of one, so images compare byte for byte (a batch of two may round a pixel otherwise
    on a CPU); lookups kept 60 s, so a model the ingress knows can meet an outage in its load."""
    return {
        "name": APP,
        "limits": {"max_images": 1, "max_steps": 10, "min_side": 32, "max_width": 64, "max_height": 64},
        "defaults": {"steps": 2},
        "pools": {"cpu": {
            "num_cpus": 0.5, "max_ongoing_requests": 4, "max_queued_requests": 16,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
            "replica": {"max_batch_images": 1, "max_models": 2},
        }},
        "ingress": {"num_cpus": 0.1, "registry_cache_s": 60, "replica_retries": 8, "replica_retry_s": 90},
        "http": {"retry_after_s": 2, "port": port},
        "auth": {"api_keys_file": api_keys_file},
    }


def request(model: str, seed: int) -> dict:
    """The fault suite's generation: 2 steps at 32x32, quick on a CPU."""
    return {"prompt": "photo of a ring", "model": model, "seed": seed, "steps": 2, "width": 32, "height": 32}


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic() when sent
    seconds: float
    status: int  # 0: the connection itself failed
    retry_after: str | None
    body: str  # the first image (base64) of a 200, else the error text


@dataclass(frozen=True)
class Figures:
    """What the users saw around a fault at `at` (time.monotonic())."""

    requests: int
    failed: int  # not 200
    statuses: dict[int, int]
    in_flight: int  # requests sent before the fault and answered after it
    added_latency_s: float  # the slowest of those, less the median latency before the fault
    images: int  # distinct images among the 200s (the clients all send one seed)


class Load:
    """`clients` threads that send the same generation (one seed) without pause until stopped."""

    def __init__(self, url: str, api_key: str, body: dict, clients: int = 2, timeout_s: float = 180):
        self.url, self.body, self.timeout_s = url, body, timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.stop = threading.Event()
        self._answers: list[Answer] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                r = requests.post(f"{self.url}/v1/images/generations", json=self.body, headers=self.headers,
                                  timeout=self.timeout_s)
                status, retry_after = r.status_code, r.headers.get("Retry-After")
                body = r.json()["data"][0]["b64_json"] if status == 200 else r.text
            except requests.RequestException as e:  # as bad as a 500 to its user
                status, retry_after, body = 0, None, repr(e)
            with self._lock:
                self._answers.append(Answer(sent, time.monotonic() - sent, status, retry_after, body))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 20)

    @property
    def answers(self) -> list[Answer]:
        with self._lock:
            return sorted(self._answers, key=lambda a: a.sent)

    def wait_for(self, successes: int, since: float, timeout_s: float = 180) -> None:
        """Until `successes` requests sent after `since` were answered 200."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(1 for a in self.answers if a.sent > since and a.status == 200) >= successes:
                return
            time.sleep(0.2)
        raise TimeoutError(f"not {successes} answers within {timeout_s} s: {self.answers[-4:]}")

    def figures(self, at: float) -> Figures:
        answers = self.answers
        before = [a.seconds for a in answers if a.sent + a.seconds < at]
        spanning = [a.seconds for a in answers if a.sent < at < a.sent + a.seconds]
        statuses: dict[int, int] = {}
        for a in answers:
            statuses[a.status] = statuses.get(a.status, 0) + 1
        return Figures(
            requests=len(answers), failed=sum(1 for a in answers if a.status != 200), statuses=statuses,
            in_flight=len(spanning),
            added_latency_s=round(max(spanning, default=0.0) - (statistics.median(before) if before else 0.0), 2),
            images=len({a.body for a in answers if a.status == 200}),
        )


def running_replicas(cluster: ServeCluster, app: str, deployment: str = "StableDiffusion") -> list[dict]:
    """A deployment's running replicas as Serve reports them (each with its pid)."""
    deployments = (cluster.application(app) or {}).get("deployments") or {}
    replicas = (deployments.get(deployment) or {}).get("replicas") or []
    return [r for r in replicas if r["state"] == "RUNNING"]


def counter(metrics_url: str, name: str) -> float:
    """A counter's total over its labels, from a node's metrics endpoint (0 until exported)."""
    text = requests.get(metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# How Ray prefixes a Ray Train worker's log lines: the process a training fault kills.
WORKER_PID = re.compile(r"\(RayTrainWorker pid=(\d+)")


def wait_for_durable_checkpoint(settings: Settings, run_name: str, timeout_s: float = 180) -> int:
    """Step of the first checkpoint that Ray Train's controller has recorded in its snapshot in
    S3: only from then on does a restarted worker or a resubmitted run resume from it."""
    from atelier.storage import Storage

    storage = Storage(settings)
    snapshot = storage.uri("runs", run_name, "checkpoint_manager_snapshot.json")

    def step() -> int | None:
        if storage.exists(snapshot):
            latest = json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result")
            return latest["metrics"]["step"] if latest else None
        return None

    return wait_until(step, timeout_s=timeout_s, interval_s=0.2, what=f"a durable checkpoint of {run_name}")


def job_events(jobs, job_id: str, kind: type) -> list:
    """The job's events of one kind, in order."""
    from atelier.training import events

    return [e for e in map(events.parse, jobs.logs(job_id).splitlines()) if isinstance(e, kind)]


class SecondNode:
    """A second Ray node on this machine, joined to the embedded head of `settings` (loopback,
    token authentication): what a new machine of a node pool is to a cluster, there to be lost.

    While `hold_head`, an actor holds every free CPU of the head, so that work scheduled meanwhile (a
    training run's workers) lands on this node; `release_head` frees them, so that the work has
    somewhere to go once this node is lost. `kill` SIGKILLs the node's every process (its raylet,
    its agents, the workers it started) at once, by the pids it reports.

    It is started through Ray's own `Node`, as `ray start --address` starts one: `ray start`
    refuses to join a head in Ray's single-machine mode, which is what keeps the embedded head on
    loopback. For tests and benchmarks only (ray._private is not a stable API).
    """

    def __init__(self, settings: Settings, *, num_cpus: int = 1, hold_head: bool = True,
                 start_timeout_s: float = 120.0):
        self.settings, self.num_cpus, self.hold_head = settings, num_cpus, hold_head
        self.start_timeout_s = start_timeout_s
        self.node_id = ""
        self.started: list[int] = []  # what Ray's Node started: the raylet, the log monitor
        self._process: subprocess.Popen | None = None
        self._temp_dir: Path | None = None

    def __enter__(self) -> SecondNode:
        # Ray puts unix sockets below its temp dir and caps their paths at ~107 bytes.
        self._temp_dir = Path(tempfile.mkdtemp(prefix="atelier-node-", dir="/tmp"))
        env = {**os.environ, **rayauth.driver_env(self.settings.embedded_ray_token_file), "OMP_NUM_THREADS": "1"}
        env.pop(rayauth.TOKEN_ENV, None)
        env.pop("RAY_ADDRESS", None)
        address = f"127.0.0.1:{self.settings.stack.ray_port}"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "atelier.bench.faults", address, str(self._temp_dir), str(self.num_cpus),
             "hold" if self.hold_head else "free"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
        try:
            started = json.loads(self._line("the second Ray node to start"))
            self.node_id, self.started = started["node_id"], started["pids"]
            if self._line("the head's free CPUs to be held").strip() != "held":
                raise ServiceError("the second Ray node's helper could not hold the head's CPUs")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _line(self, what: str) -> str:
        assert self._process and self._process.stdout
        ready, _, _ = select.select([self._process.stdout], [], [], self.start_timeout_s)
        line = self._process.stdout.readline() if ready else ""
        if not line:
            raise ServiceError(f"gave up waiting for {what} after {self.start_timeout_s:g} s "
                               f"(its helper {'exited' if self._process.poll() is not None else 'hangs'})")
        return line

    def release_head(self) -> None:
        """Free the head's CPUs (kill the actor that holds them)."""
        assert self._process and self._process.stdin
        self._process.stdin.write("release\n")
        self._process.stdin.flush()
        self._line("the head's CPUs to be freed")

    def pids(self) -> list[int]:
        """The node's processes now: what Ray's Node started (the raylet, the log monitor) and
        everything they started (the agents, the workers)."""
        import psutil

        found: list[int] = []
        for pid in self.started:
            try:
                found += [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
            except psutil.NoSuchProcess:
                pass
        return found

    def kill(self) -> list[int]:
        """SIGKILL every process of the node at once, as a machine that is lost; their pids."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def __exit__(self, *exc) -> None:
        self.kill()
        if self._process:
            self._process.kill()
            self._process.wait(timeout=30)
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)


def _second_node(address: str, temp_dir: str, num_cpus: int, hold: bool) -> None:
    """The helper process of SecondNode: start the node, hold the head's CPUs when asked, say
    so on stdout, free them on a line on stdin, then wait to be killed."""
    import ray
    from ray._private.node import Node
    from ray._private.parameter import RayParams
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    params = RayParams(gcs_address=address, node_ip_address="127.0.0.1", num_cpus=num_cpus, num_gpus=0,
                       object_store_memory=150 * 1024 * 1024, temp_dir=temp_dir, node_manager_port=0,
                       min_worker_port=0, max_worker_port=0)
    node = Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    pids = [info.process.pid for infos in node.all_processes.values() for info in infos]
    print(json.dumps({"node_id": node.node_id, "pids": pids}), flush=True)
    ray.init(address=address, log_to_driver=False)
    holder: Any = None
    if hold:
        from ray._private.state import available_resources_per_node

        head = next(n for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
        free = available_resources_per_node()[head["NodeID"]].get("CPU", 0.0)  # Serve may hold some

        class Hold:
            def ready(self) -> bool:
                return True

        on_head = NodeAffinitySchedulingStrategy(head["NodeID"], soft=False)
        actor: Any = ray.remote(Hold)
        if free > 0:
            holder = actor.options(num_cpus=free, scheduling_strategy=on_head).remote()
            ray.get(holder.ready.remote(), timeout=60)
    print("held", flush=True)
    sys.stdin.readline()
    if holder is not None:
        ray.kill(holder)
    print("released", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    _second_node(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "hold")
