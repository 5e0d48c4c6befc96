"""What a fault costs the endpoint's users: continuous load while something is killed, and the
figures of what they saw (benchmarks/faults.py prints them; tests/integration/test_faults.py
asserts on them). Faults are injected by the pid of a process the caller started, never by name.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

import requests

from atelier.endpoint.deploy import ServeCluster

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
