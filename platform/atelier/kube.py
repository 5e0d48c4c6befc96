"""The Kubernetes seam: training jobs as KubeRay RayJobs (render, submit, read status)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from atelier.errors import AtelierError, InvalidInput, NotFound, ServiceError
from atelier.rayjobs import job_env
from atelier.settings import Settings
from atelier.training.config import TrainConfig
from atelier.training.spec import TrainJobSpec

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
RESOURCE = f"{PLURAL}.{GROUP}"

# GPU nodes are picked by GKE's `cloud.google.com/gke-accelerator` label: GKE sets it on every GPU
# node by itself, and on Autopilot / node auto-provisioning the selector is what makes the cluster
# create a node with that GPU. `nvidia.com/gpu.product` (GPU Feature Discovery) would need the
# NVIDIA GPU Operator, and its A100 values differ per variant (SXM4/PCIE, 40/80 GB), which a
# nodeSelector cannot match as one. Other clouds: label the node pools with these same values.
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"

# GPU node pools carry this taint (GKE adds it itself) so that nothing else lands on them.
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def _gpu_pool(accelerator: str, cpu: str, memory: str) -> dict:
    # Requests equal limits: a worker is never OOM-killed for memory it was promised.
    amounts = {"cpu": cpu, "memory": memory}
    return {
        "nodeSelector": {ACCELERATOR_LABEL: accelerator},
        "tolerations": GPU_TOLERATIONS,
        "resources": {"requests": amounts, "limits": {**amounts, "nvidia.com/gpu": 1}},
    }


# Pod side of each worker group. Sized for one worker per node on the usual one-GPU machines
# (GKE n1-standard-8 + T4, a2-highgpu-1g), leaving room for the node's own daemons.
GPU_POOLS: dict[str, dict] = {
    "t4": _gpu_pool("nvidia-tesla-t4", cpu="6", memory="24Gi"),
    "a100": _gpu_pool("nvidia-tesla-a100", cpu="10", memory="72Gi"),
}

# KubeRay names the cluster `<rayjob>-<5 chars>` and caps cluster names at 53 (services get
# suffixes), so the operator rejects RayJob names over 47 or not a DNS-1035 label.
MAX_NAME = 47
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# The cluster is deleted this long after the job ends: GPUs are not held idle, and the job's log
# stays readable in the submitter pod (`kubectl logs job/<name>`), which outlives the cluster.
TTL_AFTER_FINISHED_S = 60
# One retry on a fresh cluster: the same run name resumes from its last checkpoint, and a
# deterministic failure costs a single extra cluster start, not many.
BACKOFF_LIMIT = 1
# The submitter's home is a path on the submitter's machine; pods get their own, on the node.
POD_HOME = "/var/lib/atelier"
REQUEST_TIMEOUT = (5, 30)


def rayjob_name(run_name: str) -> str:
    """A RayJob name for a run: a DNS-1035 label KubeRay accepts, stable for the same run."""
    name = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"run-{name}".rstrip("-")
    if len(name) > MAX_NAME:
        # Two long runs sharing a prefix must not collide (the second would be refused as a
        # duplicate), so the cut name keeps a hash of the whole one.
        digest = hashlib.sha256(run_name.encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9].rstrip('-')}-{digest}"
    return name


def render_rayjob(spec: TrainJobSpec, settings: Settings, gpu: str, name: str,
                  namespace: str) -> dict:
    """The RayJob that runs `spec` on the `gpu` worker pool: a cluster made for the job and
    deleted after it."""
    from atelier.training.submit import entrypoint

    pool = _pool(gpu)
    _check_storage(settings)
    if len(name) > MAX_NAME or not DNS1035.match(name):
        raise InvalidInput(f"RayJob name must be a DNS-1035 label of at most {MAX_NAME} "
                           "characters (lower-case letters, digits, '-'; a letter first)",
                           where=name)
    config = spec.config
    if not config.use_gpu or config.gpu_type != gpu:
        raise InvalidInput(f"the job's config must ask for the {gpu} GPU (use_gpu: true, "
                           f"gpu_type: {gpu}) to run on the {gpu} pool", where="config")
    _check_fits(config, gpu)

    labels = {
        "app.kubernetes.io/name": "atelier",
        "app.kubernetes.io/component": "training",
        "atelier.dev/run": _label_value(spec.run_name),
        "atelier.dev/gpu": gpu,
    }
    kube = settings.kube
    env = [{"name": k, "value": v} for k, v in sorted(_pod_env(settings).items())]
    env_from = [{"secretRef": {"name": kube.s3_secret}}]
    home = {"name": "atelier-home", "emptyDir": {}}
    home_mount = {"name": "atelier-home", "mountPath": POD_HOME}
    # NCCL and data loaders need more shared memory than a container's default 64 MiB.
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory"}}

    head_amounts = {"cpu": kube.head_cpu, "memory": kube.head_memory}
    # num-cpus 0: Ray schedules no training task on the head, only the job's driver runs there.
    head = {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": {
            "metadata": {"labels": labels},
            "spec": _pod_spec(kube.service_account, volumes=[home], container={
                "name": "ray-head",
                "image": kube.image,
                "ports": [
                    {"containerPort": 6379, "name": "gcs-server"},
                    {"containerPort": 8265, "name": "dashboard"},
                    {"containerPort": 10001, "name": "client"},
                ],
                "resources": {"requests": head_amounts, "limits": dict(head_amounts)},
                "env": env,
                "envFrom": env_from,
                "volumeMounts": [home_mount],
            }),
        },
    }
    # DDP needs every worker at once, so the group is fixed at num_workers.
    workers = config.num_workers
    worker = {
        "groupName": gpu,
        "replicas": workers,
        "minReplicas": workers,
        "maxReplicas": workers,
        "rayStartParams": {},
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                **_pod_spec(kube.service_account, volumes=[home, shm], container={
                    "name": "ray-worker",
                    "image": kube.image,
                    "resources": pool["resources"],
                    "env": env,
                    "envFrom": env_from,
                    "volumeMounts": [home_mount, {"name": "dshm", "mountPath": "/dev/shm"}],
                }),
                "nodeSelector": pool["nodeSelector"],
                "tolerations": pool["tolerations"],
            },
        },
    }
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            # Labels are cut to 63 characters; the annotation keeps the run name whole.
            "annotations": {"atelier.dev/run-name": spec.run_name},
        },
        "spec": {
            "entrypoint": entrypoint(spec),
            # The default mode, said out loud: a submitter Job runs `ray job submit` and keeps
            # the job's log after the cluster is gone.
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "backoffLimit": BACKOFF_LIMIT,
            "rayClusterSpec": {
                "rayVersion": kube.ray_version,
                "headGroupSpec": head,
                "workerGroupSpecs": [worker],
            },
        },
    }
    # Pieces are shared between the head and the workers (labels, env) and with GPU_POOLS; a
    # JSON round trip unshares them, so edits stay local and YAML dumps carry no anchors.
    return json.loads(json.dumps(body))


def submit_rayjob(settings: Settings, concepts_path: Path, config: TrainConfig, *, gpu: str,
                  namespace: str, concepts: list[str] | None = None,
                  run_name: str | None = None) -> str:
    """Validate, commit the dataset, create the RayJob; return its name."""
    from atelier.training.submit import prepare

    _pool(gpu)
    _check_storage(settings)
    config = config.model_copy(update={"use_gpu": True, "gpu_type": gpu})
    _check_fits(config, gpu)
    api = _api(settings)

    def cluster_answers() -> None:
        # Listing RayJobs proves at once that the cluster answers, that KubeRay's CRD is
        # installed and that we may read RayJobs here; a named run is also checked for a clash
        # before its dataset is uploaded.
        name = rayjob_name(run_name) if run_name else None
        # No limit with the selector: the server may apply a limit before filtering and answer
        # with no items although the name exists.
        found = _call(api, "list_namespaced_custom_object", GROUP, VERSION, namespace, PLURAL,
                      verb="list", namespace=namespace,
                      field_selector=f"metadata.name={name}" if name else None,
                      limit=None if name else 1)
        if name and found.get("items"):
            raise _exists(name, namespace)

    spec = prepare(settings, concepts_path, config, concepts=concepts, run_name=run_name,
                   before_upload=cluster_answers)
    name = rayjob_name(spec.run_name)
    body = render_rayjob(spec, settings, gpu, name, namespace)
    # Strict: a field the installed CRD does not know is refused, not silently dropped.
    _call(api, "create_namespaced_custom_object", GROUP, VERSION, namespace, PLURAL, body,
          verb="create", namespace=namespace, field_validation="Strict",
          conflict=_exists(name, namespace))
    return name


def rayjob_status(settings: Settings, name: str, namespace: str) -> dict:
    """jobStatus, jobDeploymentStatus, message, startTime and endTime of a RayJob (None until
    the operator reports them)."""
    obj = _call(_api(settings), "get_namespaced_custom_object", GROUP, VERSION, namespace,
                PLURAL, name, verb="get", namespace=namespace,
                missing=NotFound("no such RayJob", where=f"{namespace}/{name}"))
    status = obj.get("status") or {}
    return {key: status.get(key) for key in
            ("jobStatus", "jobDeploymentStatus", "message", "startTime", "endTime")}


def _api(settings: Settings):
    """The custom-objects API of the configured cluster: kubeconfig (context from settings),
    else the in-cluster service account. Tests replace this function to reach a fake server."""
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


def _call(api, method: str, *args, verb: str, namespace: str,
          conflict: AtelierError | None = None, missing: AtelierError | None = None, **kwargs):
    """One API call, its failures turned into the platform's errors."""
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
        if e.status == 403:
            raise ServiceError(f"forbidden to {verb} {RESOURCE}", where=where,
                               hint=f"grant a Role with verb '{verb}' on {RESOURCE} here") from e
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


def _exists(name: str, namespace: str) -> AtelierError:
    return InvalidInput(
        "RayJob already exists", where=f"{namespace}/{name}",
        hint=f"to resume this run delete it first (kubectl delete rayjob {name} -n {namespace}), "
        "or choose another --run-name",
    )


def _pool(gpu: str) -> dict:
    if gpu not in GPU_POOLS:
        raise InvalidInput(f"unknown GPU pool {gpu!r}: expected one of {', '.join(GPU_POOLS)}",
                           where="gpu")
    return GPU_POOLS[gpu]


def _check_storage(settings: Settings) -> None:
    if settings.embedded_s3:
        raise InvalidInput(
            "pods cannot reach the embedded S3 on this machine", where="s3.endpoint",
            hint="set ATELIER_S3__ENDPOINT to an S3 endpoint the cluster reaches",
        )


def _check_fits(config: TrainConfig, gpu: str) -> None:
    # Ray would wait forever for a worker bigger than the pod that should host it.
    offered = float(GPU_POOLS[gpu]["resources"]["limits"]["cpu"])
    if config.cpus_per_worker > offered:
        raise InvalidInput(f"cpus_per_worker {config.cpus_per_worker:g} is more than a {gpu} "
                           f"worker pod has ({offered:g})", where="cpus_per_worker")


def _pod_env(settings: Settings) -> dict[str, str]:
    # In the cluster the keys come from the Secret (envFrom), never from a file on the
    # submitter's machine.
    env = {k: v for k, v in job_env(settings).items() if k != "ATELIER_S3__CREDENTIALS_FILE"}
    env["ATELIER_HOME"] = POD_HOME
    return env


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def _pod_spec(service_account: str | None, *, container: dict, volumes: list[dict]) -> dict:
    spec: dict = {"containers": [container], "volumes": volumes}
    if service_account:
        spec["serviceAccountName"] = service_account
    return spec
