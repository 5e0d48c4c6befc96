"""The Ray seam: submit, follow and stop jobs through Ray's Job Submission API.

Works the same against the embedded head and any cluster's dashboard address.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from atelier.errors import AtelierError, NotFound, ServiceError
from atelier.settings import Settings

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_env(settings: Settings) -> dict[str, str]:
    """Environment a job needs to reach the same storage as the submitter.

    Keys never travel in job metadata: a job reads them from the same credentials file (embedded
    stack, same machine) or from the cluster's own environment (a Kubernetes Secret).
    """
    env = {
        "ATELIER_S3__ENDPOINT": settings.s3_endpoint,
        "ATELIER_S3__REGION": settings.s3.region,
        "ATELIER_S3__BUCKET": settings.s3.bucket,
        "ATELIER_HOME": str(settings.home),
        "OMP_NUM_THREADS": "1",
    }
    creds = settings.s3.credentials_file or (
        settings.embedded_credentials_file if settings.embedded_s3 else None
    )
    if creds:
        env["ATELIER_S3__CREDENTIALS_FILE"] = str(creds)
    return env


class Jobs:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.address = settings.ray_dashboard
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address)
            except (ConnectionError, RuntimeError) as e:
                raise ServiceError(
                    "cannot reach the Ray Jobs API", where=self.address,
                    hint="for the embedded stack: `atelier up`",
                ) from e
        return self._client

    def submit(self, entrypoint: str, *, metadata: dict[str, str] | None = None,
               entrypoint_num_cpus: float = 0) -> str:
        return self.client.submit_job(
            entrypoint=entrypoint,
            runtime_env={"env_vars": job_env(self.settings)},
            metadata=metadata or {},
            entrypoint_num_cpus=entrypoint_num_cpus,
        )

    def status(self, job_id: str) -> str:
        try:
            return str(self.client.get_job_status(job_id).value)
        except RuntimeError as e:
            raise NotFound("no such job", where=job_id) from e

    def info(self, job_id: str):
        return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        return self.client.get_job_logs(job_id)

    def stop(self, job_id: str) -> bool:
        return self.client.stop_job(job_id)

    def wait(self, job_id: str, *, on_line: Callable[[str], None] | None = None,
             timeout_s: float = 3600, poll_s: float = 0.5) -> str:
        """Wait for a terminal state, passing each new log line to `on_line`."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            status = self.status(job_id)
            if on_line:
                lines = self.logs(job_id).splitlines()
                for line in lines[seen:]:
                    on_line(line)
                seen = len(lines)
            if status in TERMINAL:
                return status
            if time.monotonic() > deadline:
                raise ServiceError(f"job still {status} after {timeout_s:.0f} s", where=job_id)
            time.sleep(poll_s)

    def cpus(self) -> tuple[float, float] | None:
        """(CPUs in use, CPUs in all) of the cluster's nodes now, from the dashboard; None where
        it does not say. An autoscaling cluster may add nodes beyond this."""
        import requests

        try:
            response = requests.get(f"{self.address.rstrip('/')}/api/cluster_status", timeout=10)
            used, total = response.json()["data"]["clusterStatus"]["loadMetricsReport"]["usage"]["CPU"]
            return float(used), float(total)
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return None

    def raise_for(self, job_id: str, status: str) -> None:
        if status != "SUCCEEDED":
            info = self.info(job_id)
            message = (info.message or "").strip().splitlines()
            raise AtelierError(f"job {status.lower()}: {message[-1] if message else 'no message'}",
                               where=job_id)


def progress_event(**fields) -> str:
    """A structured progress line a job prints and the submitter parses (one JSON per line)."""
    return "ATELIER " + json.dumps(fields, sort_keys=True)


def parse_event(line: str) -> dict | None:
    """The event in a log line; Ray prefixes worker lines with "(RayTrainWorker pid=...) "."""
    at = line.find("ATELIER {")
    if at < 0:
        return None
    try:
        return json.loads(line[at + len("ATELIER "):])
    except json.JSONDecodeError:
        return None
