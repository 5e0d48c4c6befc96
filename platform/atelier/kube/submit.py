"""Training runs on a Kubernetes cluster: submit one as a RayJob (check, upload its dataset,
create the rendered manifest) and read back the status KubeRay reports."""

from __future__ import annotations

from pathlib import Path

from atelier import pools
from atelier.errors import AtelierError, InvalidInput, NotFound
from atelier.kube import api
from atelier.kube.api import GROUP, PLURAL, VERSION
from atelier.kube.render import check_storage, rayjob_name, render_rayjob
from atelier.settings import Settings
from atelier.training.config import TrainConfig


def submit_rayjob(settings: Settings, concepts_path: Path, config: TrainConfig, *, gpu: str,
                  namespace: str, concepts: list[str] | None = None,
                  run_name: str | None = None) -> str:
    """Validate, commit the dataset, create the RayJob; return its name."""
    from atelier.training.submit import prepare

    pool = pools.pool(gpu, gpu=True)
    check_storage(settings)
    config = config.model_copy(update={"use_gpu": True, "gpu_type": gpu})
    pool.check_fits("cpus_per_worker", cpus=config.cpus_per_worker, gpus=1)
    client = api.connect(settings)

    def cluster_answers() -> None:
        # Listing RayJobs proves at once that the cluster answers, that KubeRay's CRD is
        # installed and that we may read RayJobs here; a named run is also checked for a clash
        # before its dataset is uploaded.
        name = rayjob_name(run_name) if run_name else None
        # No limit with the selector: the server may apply a limit before filtering and answer
        # with no items although the name exists.
        found = api.call(client, "list_namespaced_custom_object", GROUP, VERSION, namespace,
                         PLURAL, verb="list", namespace=namespace,
                         field_selector=f"metadata.name={name}" if name else None,
                         limit=None if name else 1)
        if name and found.get("items"):
            raise _exists(name, namespace)

    spec = prepare(settings, concepts_path, config, concepts=concepts, run_name=run_name,
                   before_upload=cluster_answers)
    name = rayjob_name(spec.run_name)
    body = render_rayjob(spec, settings, gpu, name, namespace)
    # Strict: a field the installed CRD does not know is refused, not silently dropped.
    api.call(client, "create_namespaced_custom_object", GROUP, VERSION, namespace, PLURAL, body,
             verb="create", namespace=namespace, field_validation="Strict",
             conflict=_exists(name, namespace))
    return name


def rayjob_status(settings: Settings, name: str, namespace: str) -> dict:
    """jobStatus, jobDeploymentStatus, message, startTime and endTime of a RayJob (None until
    the operator reports them)."""
    obj = api.call(api.connect(settings), "get_namespaced_custom_object", GROUP, VERSION,
                   namespace, PLURAL, name, verb="get", namespace=namespace,
                   missing=NotFound("no such RayJob", where=f"{namespace}/{name}"))
    status = obj.get("status") or {}
    return {key: status.get(key) for key in
            ("jobStatus", "jobDeploymentStatus", "message", "startTime", "endTime")}


def _exists(name: str, namespace: str) -> AtelierError:
    return InvalidInput(
        "RayJob already exists", where=f"{namespace}/{name}",
        hint=f"to resume this run delete it first (kubectl delete rayjob {name} -n {namespace}), "
        "or choose another --run-name",
    )
