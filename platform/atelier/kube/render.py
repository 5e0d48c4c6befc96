"""Training runs as KubeRay RayJob manifests: pure rendering, no cluster involved."""

from __future__ import annotations

import hashlib
import json
import re

from atelier import pools
from atelier.environment import POD_HOME, pod_env
from atelier.errors import InvalidInput
from atelier.kube.api import GROUP, KIND, VERSION
from atelier.names import slug
from atelier.settings import Settings
from atelier.training.spec import TrainJobSpec

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


def rayjob_name(run_name: str) -> str:
    """A RayJob name for a run: a DNS-1035 label KubeRay accepts, stable for the same run."""
    name = slug(run_name)
    if not name or not name[0].isalpha():
        name = f"run-{name}".rstrip("-")
    if len(name) > MAX_NAME:
        # Two long runs sharing a prefix must not collide (the second would be refused as a
        # duplicate), so the cut name keeps a hash of the whole one.
        digest = hashlib.sha256(run_name.encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9].rstrip('-')}-{digest}"
    return name


def check_storage(settings: Settings) -> None:
    """Refuse the embedded S3: it listens on this machine, where no pod reaches it."""
    if settings.embedded_s3:
        raise InvalidInput(
            "pods cannot reach the embedded S3 on this machine", where="s3.endpoint",
            hint="set ATELIER_S3__ENDPOINT to an S3 endpoint the cluster reaches, or install "
            "the chart in the namespace: its settings ConfigMap names the storage",
        )


def render_rayjob(spec: TrainJobSpec, settings: Settings, gpu: str, name: str,
                  namespace: str, *, entrypoint: str | None = None, concurrent: int = 1) -> dict:
    """The RayJob that runs `spec` on the `gpu` worker pool: a cluster made for the job and
    deleted after it. `entrypoint` replaces the training job's command (a sweep's); the worker
    group holds `concurrent` runs' workers at once (a sweep's trials)."""
    from atelier.training.submit import entrypoint as train_entrypoint

    pool = pools.pool(gpu, gpu=True)
    check_storage(settings)
    if len(name) > MAX_NAME or not DNS1035.match(name):
        raise InvalidInput(f"RayJob name must be a DNS-1035 label of at most {MAX_NAME} "
                           "characters (lower-case letters, digits, '-'; a letter first)",
                           where=name)
    config = spec.config
    if not config.use_gpu or config.gpu_type != gpu:
        raise InvalidInput(f"the job's config must ask for the {gpu} GPU (use_gpu: true, "
                           f"gpu_type: {gpu}) to run on the {gpu} pool", where="config")
    # Each Ray Train worker takes one GPU and its CPUs in one worker pod.
    pool.check_fits("cpus_per_worker", cpus=config.cpus_per_worker, gpus=1)

    labels = {
        "app.kubernetes.io/name": "atelier",
        "app.kubernetes.io/component": "training",
        "atelier.dev/run": _label_value(spec.run_name),
        "atelier.dev/gpu": gpu,
    }
    kube = settings.kube
    env = [{"name": k, "value": v} for k, v in sorted(pod_env(settings).items())]
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
    # DDP needs every worker of a run at once, so the group is fixed at num_workers per run.
    if concurrent < 1:
        raise InvalidInput("concurrent runs must be at least 1", where="max_concurrent")
    workers = config.num_workers * concurrent
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
                    "resources": pool.resources(),
                    "env": env,
                    "envFrom": env_from,
                    "volumeMounts": [home_mount, {"name": "dshm", "mountPath": "/dev/shm"}],
                }),
                "nodeSelector": pool.node_selector(),
                "tolerations": pool.tolerations(),
            },
        },
    }
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            # Labels are cut to 63 characters; the annotation keeps the run name whole.
            "annotations": {"atelier.dev/run-name": spec.run_name},
        },
        "spec": {
            "entrypoint": entrypoint or train_entrypoint(spec),
            # The default mode, said out loud: a submitter Job runs `ray job submit` and keeps
            # the job's log after the cluster is gone.
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "backoffLimit": BACKOFF_LIMIT,
            "rayClusterSpec": {
                "rayVersion": kube.ray_version,
                # Ray's token authentication (KubeRay >= 1.5.1, Ray >= 2.52): the operator gives
                # every Ray container the token, from the named Secret or one it generates.
                "authOptions": {"mode": "token", **(
                    {"secretName": kube.ray_token_secret} if kube.ray_token_secret else {})},
                "headGroupSpec": head,
                "workerGroupSpecs": [worker],
            },
        },
    }
    # Pieces are shared between the head and the workers (labels, env); a JSON round trip
    # unshares them, so edits stay local and YAML dumps carry no anchors.
    return json.loads(json.dumps(body))


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


# Every pod runs as the image's `ray` user (uid 1000, gid 100; docker/README.md), unprivileged:
# the chart's podSecurityContext and containerSecurityContext defaults (a test keeps them equal).
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
                      "capabilities": {"drop": ["ALL"]}}


def _pod_spec(service_account: str | None, *, container: dict, volumes: list[dict]) -> dict:
    # Ray's pods never call the Kubernetes API (KubeRay's submitter Job does): no token mounted.
    spec: dict = {"containers": [{**container, "securityContext": CONTAINER_SECURITY}],
                  "volumes": volumes, "securityContext": POD_SECURITY,
                  "automountServiceAccountToken": False}
    if service_account:
        spec["serviceAccountName"] = service_account
    return spec
