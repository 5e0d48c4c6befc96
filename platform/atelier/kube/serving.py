"""The endpoint on a cluster: the status KubeRay reports for the chart's RayService."""

from __future__ import annotations

from typing import Any

from atelier.errors import NotFound
from atelier.kube import api
from atelier.kube.api import GROUP, VERSION
from atelier.settings import Settings

PLURAL = "rayservices"


def rayservice_status(settings: Settings, name: str, namespace: str) -> dict[str, Any]:
    """Whether the RayService serves (its Ready condition and why), the active and any pending
    (upgrading) Ray cluster, the number of Serve endpoints, and each application's and
    deployment's status."""
    obj = api.call(api.connect(settings), "get_namespaced_custom_object", GROUP, VERSION,
                   namespace, PLURAL, name, verb="get", namespace=namespace,
                   resource=f"{PLURAL}.{GROUP}",
                   missing=NotFound("no such RayService", where=f"{namespace}/{name}",
                                    hint="the chart's RayService is named after the release "
                                    "(`helm install atelier` makes `atelier`): pass --name"))
    status = obj.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready") or {}
    active = status.get("activeServiceStatus") or {}
    pending = status.get("pendingServiceStatus") or {}
    rows = []
    for app, found in sorted((active.get("applicationStatuses") or {}).items()):
        deployments = sorted((found.get("serveDeploymentStatuses") or {}).items()) or [("-", {})]
        rows += [(app, found.get("status"), deployment, dep.get("status"))
                 for deployment, dep in deployments]
    return {
        "ready": ready.get("status") == "True",
        "reason": ready.get("reason") or ready.get("message"),
        "cluster": active.get("rayClusterName"),
        "upgrading_to": pending.get("rayClusterName"),
        "endpoints": status.get("numServeEndpoints", 0),
        "applications": rows,
    }
