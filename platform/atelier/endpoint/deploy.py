"""The Ray Serve seam: deploy, inspect and delete the application through the Ray dashboard's
REST API, the same API KubeRay drives for a RayService, so the local head and a remote cluster
are handled alike and the document deployed is the serveConfigV2 `atelier serve config` writes.
Every request carries the cluster's token (rayauth)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from atelier import rayauth
from atelier.endpoint.config import ServeConfig
from atelier.endpoint.keys import local_api_keys
from atelier.endpoint.rayservice import serve_config_v2
from atelier.errors import ServiceError
from atelier.rayjobs import job_env
from atelier.registry import Registry
from atelier.settings import Settings
from atelier.storage import Storage
from atelier.waiting import NotYet, wait_until

APPLICATIONS = "/api/serve/applications/"
TIMEOUT = (5, 60)


def local_document(settings: Settings, config: ServeConfig) -> dict[str, Any]:
    """serveConfigV2 for a cluster on this machine: replicas get the same storage settings (and
    credentials file) as the CLI, like the training jobs do."""
    return serve_config_v2(config, env=job_env(settings))


class ServeCluster:
    """Serve on the Ray cluster whose dashboard `settings.ray_dashboard` names."""

    def __init__(self, settings: Settings):
        self.address = settings.ray_dashboard.rstrip("/")
        self.headers = rayauth.headers(settings)

    def _request(self, method: str, path: str, body: Any = None):
        import requests

        try:
            response = requests.request(method, self.address + path, json=body, timeout=TIMEOUT,
                                        headers=self.headers)
        except requests.RequestException as e:
            raise ServiceError("cannot reach the Ray dashboard", where=self.address,
                               hint="for the embedded stack: `atelier up`") from e
        if response.status_code != 200:
            text = response.text.strip().splitlines()
            raise ServiceError(f"Serve API answered {response.status_code}: "
                               f"{text[-1][:500] if text else 'no message'}", where=self.address + path)
        return response

    def deploy(self, document: dict[str, Any]) -> None:
        """Put `document` (serveConfigV2): applications it names are created or updated."""
        self._request("PUT", APPLICATIONS, document)

    def details(self) -> dict[str, Any]:
        """Serve's instance details: applications, deployments, replicas, proxies."""
        return self._request("GET", APPLICATIONS).json()

    def delete(self) -> None:
        """Shut Serve down on the cluster: every application and the proxies."""
        self._request("DELETE", APPLICATIONS)

    def application(self, name: str) -> dict[str, Any] | None:
        return (self.details().get("applications") or {}).get(name)

    def replicas(self, name: str, deployment: str) -> dict[str, int]:
        """Replica count by state (RUNNING, STARTING, STOPPING, ...) of one deployment."""
        app = self.application(name) or {}
        found = (app.get("deployments") or {}).get(deployment) or {}
        return dict(Counter(r["state"] for r in found.get("replicas") or []))

    def wait_running(self, name: str, *, timeout_s: float = 300,
                     on_status: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Wait until application `name` runs; ServiceError with Serve's message if it fails."""
        seen: list[str] = []

        def running() -> dict[str, Any]:
            app = self.application(name) or {}
            status = str(app.get("status") or "NOT_STARTED")
            if on_status and seen[-1:] != [status]:
                on_status(status)
            seen.append(status)
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                message = (app.get("message") or "").strip().splitlines()
                raise ServiceError(f"application {status.lower()}: "
                                   f"{message[-1][:500] if message else 'no message'}", where=name)
            if status != "RUNNING":
                raise NotYet(f"still {status}")
            return app

        return wait_until(running, timeout_s=timeout_s, interval_s=0.5,
                          what="the application to run", where=name)


def with_models(settings: Settings, config: ServeConfig, models: list[str]) -> ServeConfig:
    """`config` as deployed on this machine: `models` preloaded (the first is the default of
    requests that name none) and, where keys are required but no file is named, the local key file.

    A model that does not exist is refused here, rather than deployed as a replica that keeps
    failing to load it.
    """
    registry = Registry(Storage(settings))
    for ref in models:
        if ref not in config.base_models:
            registry.get(ref)
    updates: dict[str, Any] = {}
    if models:
        updates["default_model"] = models[0]
        updates["preload"] = list(dict.fromkeys([*config.preload, *models]))
    if config.auth.required and config.auth.api_keys_file is None:
        # Keys never travel in the deployed config (the dashboard shows it): replicas read the
        # file, on this machine.
        updates["auth"] = config.auth.model_copy(update={"api_keys_file": local_api_keys(settings)})
    return ServeConfig.parse(config.model_dump() | updates, where="serve config")


def serve_up(settings: Settings, config: ServeConfig, models: Sequence[str] = (), *,
             timeout_s: float = 600, on_status: Callable[[str], None] | None = None
             ) -> tuple[ServeConfig, str]:
    """Deploy the application on the cluster `settings` names and wait until it runs; return the
    config deployed and the API's URL."""
    import requests

    config = with_models(settings, config, list(models))
    cluster = ServeCluster(settings)
    cluster.deploy(local_document(settings, config))
    deadline = time.monotonic() + timeout_s
    cluster.wait_running(config.name, timeout_s=timeout_s, on_status=on_status)
    url = f"http://{config.http.host}:{config.http.port}{config.route_prefix.rstrip('/')}"

    def healthy() -> bool:
        answer = requests.get(f"{url}/healthz", timeout=5)
        if answer.status_code != 200:
            raise NotYet(f"answered {answer.status_code}")
        return True

    # The proxy learns the application's route a moment after Serve reports it running; until
    # then a request is refused or answered 404.
    wait_until(healthy, timeout_s=max(deadline - time.monotonic(), 0), interval_s=0.2,
               retry_on=(requests.RequestException,), what=f"an answer from {url}/healthz",
               where=config.name)
    return config, url
