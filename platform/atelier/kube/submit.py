"""Training runs on a Kubernetes cluster: submit one as a RayJob (check, upload its dataset,
create the rendered manifest) and read back the status KubeRay reports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ValidationError

from atelier import pools
from atelier.errors import (
    AtelierError,
    InvalidInput,
    NotFound,
    ServiceError,
    describe_validation_error,
)
from atelier.kube import api
from atelier.kube.api import GROUP, PLURAL, VERSION
from atelier.kube.render import check_storage, rayjob_name, render_rayjob
from atelier.settings import Settings
from atelier.training.config import TrainConfig
from atelier.training.spec import TrainJobSpec


def installation_settings(settings: Settings, client, namespace: str,
                          said: Callable[[str], None]) -> Settings:
    """`settings` with what the chart's settings ConfigMap in `namespace` holds for every value
    not set here (environment or code); what it filled goes to `said`. Without the ConfigMap (no
    chart installed there) or the right to read it, `settings` as they are."""
    name = settings.kube.settings_configmap
    if not name:
        return settings
    where = f"ConfigMap {namespace}/{name}"
    missing, forbidden = NotFound("absent", where=where), ServiceError("forbidden", where=where)
    try:
        found = api.call(api.core(client), "read_namespaced_config_map", name, namespace,
                         verb="get", namespace=namespace, missing=missing, forbidden=forbidden,
                         resource="configmaps")
    except (NotFound, ServiceError) as e:
        if e is missing:
            return settings
        if e is forbidden:
            said(f"not allowed to read the {where}: using the settings given here only")
            return settings
        raise
    updates: dict[str, dict[str, str]] = {}
    for key, value in sorted((found.data or {}).items()):
        # ATELIER_<SECTION>__<FIELD>, as the pods read it. A key this version does not know
        # (a newer chart) is left to the pods.
        section, _, field = key.removeprefix("ATELIER_").lower().partition("__")
        sub = getattr(settings, section, None) if key.startswith("ATELIER_") else None
        if isinstance(sub, BaseModel) and field in type(sub).model_fields \
                and field not in sub.model_fields_set:
            updates.setdefault(section, {})[field] = value
    filled = {}
    for section, fields in updates.items():
        sub = getattr(settings, section)
        try:
            filled[section] = type(sub).model_validate(
                {**sub.model_dump(exclude_unset=True), **fields})
        except ValidationError as e:
            raise InvalidInput(f"invalid setting: {describe_validation_error(e)}",
                               where=where) from e
    if updates:
        said(f"from {where}: " + ", ".join(
            f"{section}.{field}" for section, fields in updates.items() for field in fields))
    return settings.model_copy(update=filled)


def submit_rayjob(settings: Settings, concepts_path: Path, config: TrainConfig, *, gpu: str,
                  namespace: str, concepts: list[str] | None = None,
                  run_name: str | None = None,
                  said: Callable[[str], None] = lambda line: None,
                  command: Callable[[TrainJobSpec], str] | None = None, concurrent: int = 1) -> str:
    """Validate, commit the dataset, create the RayJob; return its name. What was taken from
    the installation's settings ConfigMap goes to `said`. `command` makes the job's entrypoint
    from the prepared spec (default: the training job; a sweep wraps it), and `concurrent` runs
    are given workers at once (a sweep's trials)."""
    from atelier.training.submit import prepare

    pool = pools.pool(gpu, gpu=True)
    config = config.model_copy(update={"use_gpu": True, "gpu_type": gpu})
    pool.check_fits("cpus_per_worker", cpus=config.cpus_per_worker, gpus=1)
    client = api.connect(settings)
    settings = installation_settings(settings, client, namespace, said)
    check_storage(settings)

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
    body = render_rayjob(spec, settings, gpu, name, namespace,
                         entrypoint=command(spec) if command else None, concurrent=concurrent)
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
