"""The one seam to the Kubernetes API: a client for the configured cluster, and every call's
failures turned into the platform's errors. Tests put a fake API server behind `connect`."""

from __future__ import annotations

import json
import os

from atelier.errors import AtelierError, NotFound, ServiceError
from atelier.settings import Settings

# The custom resource Atelier creates: KubeRay's RayJob.
GROUP, VERSION, PLURAL, KIND = "ray.io", "v1", "rayjobs", "RayJob"
RESOURCE = f"{PLURAL}.{GROUP}"
REQUEST_TIMEOUT = (5, 30)


def connect(settings: Settings):
    """The custom-objects API of the configured cluster: kubeconfig (context from settings),
    else the in-cluster service account."""
    from kubernetes import client, config

    conf = client.Configuration()
    try:
        # The client reads KUBECONFIG once, at import; read it now so a change is seen.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                context=settings.kube.context, client_configuration=conf)
    except (config.ConfigException, OSError) as kube_error:
        try:
            config.load_incluster_config(client_configuration=conf)
        except config.ConfigException:
            raise ServiceError(
                f"no usable Kubernetes configuration: {kube_error}",
                where=f"context {settings.kube.context}" if settings.kube.context else "kubeconfig",
                hint="set KUBECONFIG or ATELIER_KUBE__CONTEXT, or run inside the cluster",
            ) from kube_error
    return client.CustomObjectsApi(client.ApiClient(conf))


def core(custom_api):
    """The core (v1) API on the same connection as `custom_api`: ConfigMaps."""
    from kubernetes import client

    return client.CoreV1Api(custom_api.api_client)


def call(api, method: str, *args, verb: str, namespace: str,
         conflict: AtelierError | None = None, missing: AtelierError | None = None,
         forbidden: AtelierError | None = None, resource: str = RESOURCE, **kwargs):
    """One API call, its failures turned into the platform's errors (`conflict` for a 409,
    `missing` for a 404 of the object itself, `forbidden` for a 403; `resource` names what was
    asked for)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    where = f"namespace {namespace}"
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return getattr(api, method)(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
    except ApiException as e:
        status = _status(e)
        if e.status == 409 and conflict:
            raise conflict from e
        if e.status == 404 and (status.get("details") or {}).get("kind") == "namespaces":
            raise NotFound("namespace does not exist", where=namespace) from e
        if e.status == 404 and missing:
            raise missing from e
        if e.status == 404:
            raise ServiceError(f"the cluster has no {RESOURCE} ({GROUP}/{VERSION}) resource",
                               where=where, hint="install the KubeRay operator and its CRDs") from e
        if e.status == 401:
            raise ServiceError("the Kubernetes API refused the credentials (401)", where=where,
                               hint="refresh the kubeconfig context's login or token") from e
        if e.status == 403 and forbidden:
            raise forbidden from e
        if e.status == 403:
            raise ServiceError(f"forbidden to {verb} {resource}", where=where,
                               hint=f"grant a Role with verb '{verb}' on {resource} here") from e
        raise ServiceError(f"Kubernetes API answered {e.status}: "
                           f"{status.get('message') or e.reason}", where=where,
                           hint="a rejected field: is KubeRay 1.7 or later installed?"
                           if e.status in (400, 422) else None) from e
    except (HTTPError, OSError) as e:
        raise ServiceError("cannot reach the Kubernetes API",
                           where=api.api_client.configuration.host) from e


def _status(e) -> dict:
    """The Status object an API error carries, or {}."""
    try:
        status = json.loads(e.body)
    except (TypeError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}
