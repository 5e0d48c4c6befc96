"""The Ray seam: submit, follow and stop jobs through Ray's Job Submission API.

Works the same against the embedded head and any cluster's dashboard address; every request
carries the cluster's token (rayauth).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from atelier import rayauth
from atelier.environment import job_env
from atelier.errors import AtelierError, NotFound, ServiceError
from atelier.settings import Settings
from atelier.waiting import wait_until

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class Jobs:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.address = settings.ray_dashboard
        self._client: Any = None  # ray.job_submission.JobSubmissionClient, made on first use

    @property
    def client(self):
        if self._client is None:
            from ray.exceptions import AuthenticationError
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address,
                                                   headers=rayauth.headers(self.settings))
            except AuthenticationError as e:
                raise ServiceError(
                    "the Ray Jobs API refused the token", where=self.address,
                    hint=_token_hint(self.settings),
                ) from e
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
             timeout_s: float = 3600) -> str:
        """Wait for a terminal state, passing each log line to `on_line` as the job prints it
        (from the first line on); return that state."""
        import asyncio

        self.status(job_id)  # NotFound for a job that does not exist
        try:
            asyncio.run(asyncio.wait_for(self._follow(job_id, on_line), timeout_s))
        except TimeoutError:
            raise ServiceError(f"job still {self.status(job_id)} after {timeout_s:g} s",
                               where=job_id) from None

        def terminal() -> str | None:
            status = self.status(job_id)
            return status if status in TERMINAL else None

        # Ray ends the log stream once the job is over, so its state is terminal by now (or a
        # moment later, where the dashboard's view lags).
        return wait_until(terminal, timeout_s=10, what="a terminal state", where=job_id)

    async def _follow(self, job_id: str, on_line: Callable[[str], None] | None) -> None:
        """Ray's log stream (a websocket, chunks as the job prints them) cut into lines."""
        import aiohttp

        # Ray's SDK logs an INFO line when the stream ends, which lands amid a progress bar;
        # its end is reported by our return value instead.
        logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
        partial = ""  # a chunk can end inside a line (Ray cuts long ones)
        try:
            async for chunk in self.client.tail_job_logs(job_id):
                lines = (partial + chunk).splitlines(keepends=True)
                partial = lines.pop() if lines and lines[-1] == lines[-1].rstrip("\r\n") else ""
                if on_line:
                    for line in lines:
                        on_line(line.rstrip("\r\n"))
        except (aiohttp.ClientError, RuntimeError) as e:
            raise ServiceError(f"lost the job's log stream: {e}", where=job_id) from e
        if partial and on_line:
            on_line(partial)

    def cpus(self) -> tuple[float, float] | None:
        """(CPUs in use, CPUs in all) of the cluster's nodes now, from the dashboard; None where
        it does not say. An autoscaling cluster may add nodes beyond this."""
        import requests

        try:
            response = requests.get(f"{self.address.rstrip('/')}/api/cluster_status", timeout=10,
                                    headers=rayauth.headers(self.settings))
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


def _token_hint(settings: Settings) -> str:
    if settings.ray_address is None:
        return (f"the embedded head's token is {settings.embedded_ray_token_file}; if it was "
                "deleted or replaced while the head ran: `atelier down`, then `atelier up`")
    return f"set {rayauth.TOKEN_ENV} or {rayauth.TOKEN_PATH_ENV} to the cluster's token"
