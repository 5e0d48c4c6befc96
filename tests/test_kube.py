"""The Kubernetes seam: RayJobs checked against KubeRay's CRD, submitted to a fake API server."""

from __future__ import annotations

import json
import re
import shlex
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

import kuberay
from atelier import kube, pools
from atelier.environment import POD_HOME, pod_env
from atelier.errors import InvalidInput, NotFound, ServiceError
from atelier.kube import api as kube_api
from atelier.settings import KubeSettings, S3Settings, Settings
from atelier.storage import Storage
from atelier.training.config import TrainConfig
from atelier.training.spec import TrainJobSpec
from atelier.training.submit import entrypoint
from support import CHECKOV_EXPLAINED, checkov_failures

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
ACCESS_KEY, SECRET_KEY = "AKIAATELIERTESTKEY", "s3cr3t-never-in-a-manifest"


# -- rendering -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crds():
    """KubeRay 1.7's CRDs, for checks made as the API server makes them (tests/kuberay.py)."""
    if not kuberay.available():
        pytest.skip(kuberay.MISSING)


@pytest.fixture
def cluster_settings(tmp_path) -> Settings:
    """Settings of a submitter whose S3 keys sit in a local credentials file."""
    creds = tmp_path / "s3-credentials"
    creds.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\n"
                     f"aws_secret_access_key = {SECRET_KEY}\n")
    return Settings(
        home=tmp_path / "home",
        s3=S3Settings(endpoint="http://minio.storage:9000", bucket="shop", credentials_file=creds),
        kube=KubeSettings(image="registry.example/atelier:test", s3_secret="shop-s3"),
    )


def job_spec(gpu: str = "t4", workers: int = 3, run_name: str = "shop-20260101-120000"):
    return TrainJobSpec(
        config=TrainConfig(use_gpu=True, gpu_type=gpu, num_workers=workers, model_name="shop"),
        dataset_uri="s3://shop/datasets/0123456789abcdef0123", dataset_sha256="ab" * 32,
        run_name=run_name,
    )


def render(settings, gpu="t4", workers=3, run_name="shop-20260101-120000", namespace="ml"):
    spec = job_spec(gpu, workers, run_name)
    return kube.render_rayjob(spec, settings, gpu, kube.rayjob_name(run_name), namespace)


def head_of(body):
    return body["spec"]["rayClusterSpec"]["headGroupSpec"]


def workers_of(body):
    (group,) = body["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


@pytest.mark.parametrize("gpu", ["t4", "a100"])
def test_should_render_a_rayjob_that_kuberay_1_7s_crd_accepts(gpu, cluster_settings, crds):
    assert kuberay.problems(render(cluster_settings, gpu)) == []


def test_should_find_a_misspelt_field_the_crd_does_not_know(cluster_settings, crds):
    body = render(cluster_settings)
    workers_of(body)["replica"] = 2
    head_of(body)["rayStartParams"]["num-cpus"] = 0
    problems = kuberay.problems(body)
    assert "/spec/rayClusterSpec/workerGroupSpecs/0/replica: unknown field" in problems
    assert any("num-cpus" in p and "string" in p for p in problems)


def test_should_break_the_crds_cel_rules_when_a_rayjob_does(cluster_settings, crds):
    body = render(cluster_settings)
    body["spec"]["managedBy"] = "someone-else"
    body["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}
    assert kuberay.problems(body) == [
        "/spec/managedBy: the managedBy field value must be either 'ray.io/kuberay-operator' "
        "or 'kueue.x-k8s.io/multikueue'",
        "/spec/deletionStrategy: deletionStrategy requires either BOTH onSuccess and onFailure, "
        "OR the deletionRules field (cannot be empty)"]


def test_should_apply_the_crds_transition_rules_only_to_an_update(cluster_settings, crds):
    old = render(cluster_settings)
    old["spec"]["managedBy"] = "ray.io/kuberay-operator"
    new = json.loads(json.dumps(old))
    new["spec"]["managedBy"] = "kueue.x-k8s.io/multikueue"
    assert kuberay.problems(new) == []
    assert kuberay.problems(new, old=old) == ["/spec/managedBy: the managedBy field is immutable"]


def test_checkov_should_find_nothing_unexplained_in_a_rayjob(cluster_settings, tmp_path):
    failed, summary = checkov_failures([render(cluster_settings, "t4"), render(
        cluster_settings, "a100", run_name="shop-a100")], tmp_path)
    assert summary["resource_count"] >= 6  # two RayJobs and their head and worker pods
    explained = {**CHECKOV_EXPLAINED, "CKV2_K8S_6": (
        "no NetworkPolicy selects a job's pods (the chart's selects the RayService's): the job's "
        "Ray is closed by its token; a policy for training pods is an open item")}
    assert sorted(f for f in failed if f[0] not in explained) == []


def test_should_run_the_jobs_ray_with_token_authentication(cluster_settings):
    auth = render(cluster_settings)["spec"]["rayClusterSpec"]["authOptions"]
    assert auth == {"mode": "token"}  # KubeRay generates the cluster's token
    named = cluster_settings.model_copy(update={"kube": cluster_settings.kube.model_copy(
        update={"ray_token_secret": "atelier-ray-token"})})
    auth = render(named)["spec"]["rayClusterSpec"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "atelier-ray-token"}


@pytest.mark.parametrize(("gpu", "accelerator"),
                         [("t4", "nvidia-tesla-t4"), ("a100", "nvidia-tesla-a100")])
def test_should_set_the_node_selector_toleration_and_one_gpu_of_the_chosen_pool(
        gpu, accelerator, cluster_settings):
    pod = workers_of(render(cluster_settings, gpu))["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": accelerator}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
        in pod["tolerations"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"] == pools.POOLS[gpu].resources()
    assert container["image"] == "registry.example/atelier:test"


def test_should_give_the_a100_pool_more_cpu_and_memory_than_the_t4_pool(cluster_settings):
    t4, a100 = (workers_of(render(cluster_settings, g))["template"]["spec"]["containers"][0]
                ["resources"]["limits"] for g in ("t4", "a100"))
    assert float(a100["cpu"]) > float(t4["cpu"])
    assert int(a100["memory"].removesuffix("Gi")) > int(t4["memory"].removesuffix("Gi"))


def test_should_run_one_fixed_worker_replica_per_ray_train_worker(cluster_settings):
    group = workers_of(render(cluster_settings, "a100", workers=4))
    assert group["groupName"] == "a100"
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (4, 4, 4)


def test_should_keep_training_and_gpus_off_the_head(cluster_settings):
    head = head_of(render(cluster_settings))
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}
    pod = head["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    (container,) = pod["containers"]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}


def test_should_run_the_job_spec_as_the_entrypoint(cluster_settings):
    body = render(cluster_settings, "a100", workers=2)
    spec = job_spec("a100", 2)
    assert body["spec"]["entrypoint"] == entrypoint(spec)
    assert TrainJobSpec.model_validate_json(shlex.split(body["spec"]["entrypoint"])[-1]) == spec


def test_should_delete_the_cluster_soon_after_the_job_ends(cluster_settings):
    spec = render(cluster_settings)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 600
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["backoffLimit"] >= 0
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"


def test_should_take_s3_keys_from_the_secret_and_never_from_the_body(cluster_settings):
    body = render(cluster_settings)
    text = json.dumps(body)
    for secret in (ACCESS_KEY, SECRET_KEY, "CREDENTIALS_FILE", "AWS_SECRET_ACCESS_KEY",
                   str(cluster_settings.s3.credentials_file), str(cluster_settings.home)):
        assert secret not in text
    for group in (head_of(body), workers_of(body)):
        (container,) = group["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "shop-s3"}}]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["ATELIER_S3__ENDPOINT"] == "http://minio.storage:9000"
        assert env["ATELIER_S3__BUCKET"] == "shop"


def test_should_give_every_pod_the_one_pod_environment_and_leave_threads_to_ray(
        cluster_settings):
    body = render(cluster_settings)
    for group in (head_of(body), workers_of(body)):
        (container,) = group["template"]["spec"]["containers"]
        assert {e["name"]: e["value"] for e in container["env"]} == pod_env(cluster_settings)
        assert {"name": "atelier-home", "mountPath": POD_HOME} in container["volumeMounts"]
    # Ray gives a worker as many threads as the CPUs it reserved, unless the pod pins them.
    assert "OMP_NUM_THREADS" not in json.dumps(body)


def test_should_label_the_rayjob_and_every_pod_with_the_run_and_the_gpu(cluster_settings):
    body = render(cluster_settings, "a100", run_name="shop.v2_final")
    expected = {"app.kubernetes.io/name": "atelier", "atelier.dev/run": "shop.v2_final",
                "atelier.dev/gpu": "a100"}
    for labels in (body["metadata"]["labels"], head_of(body)["template"]["metadata"]["labels"],
                   workers_of(body)["template"]["metadata"]["labels"]):
        assert expected.items() <= labels.items()


def test_should_dump_as_plain_yaml_for_kubectl(cluster_settings):
    body = render(cluster_settings)
    head_of(body)["template"]["metadata"]["labels"]["extra"] = "head only"
    assert "extra" not in workers_of(body)["template"]["metadata"]["labels"]
    assert "&id" not in yaml.safe_dump(body)


def test_should_derive_a_short_dns_label_from_a_long_run_name(cluster_settings):
    long_run = "2026.shop_" + "x" * 60 + "-a"
    body = render(cluster_settings, run_name=long_run)
    name = body["metadata"]["name"]
    # KubeRay adds 6 characters for the RayCluster and caps that at 53; 63 is the DNS limit.
    assert DNS1035.match(name) and len(name) <= 47
    assert body["metadata"]["annotations"]["atelier.dev/run-name"] == long_run
    label = body["metadata"]["labels"]["atelier.dev/run"]
    assert LABEL_VALUE.match(label) and len(label) <= 63
    assert kube.rayjob_name(long_run[:-1] + "b") != name
    assert kube.rayjob_name(long_run) == name


def test_should_refuse_a_config_that_does_not_ask_for_the_pools_gpu(cluster_settings):
    spec = job_spec("t4")
    with pytest.raises(InvalidInput, match="a100"):
        kube.render_rayjob(spec, cluster_settings, "a100", "shop", "ml")


def test_should_refuse_a_name_kuberay_would_reject(cluster_settings):
    with pytest.raises(InvalidInput, match="DNS-1035"):
        kube.render_rayjob(job_spec(), cluster_settings, "t4", "1-starts-with-a-digit", "ml")


def test_should_refuse_an_unknown_gpu_pool(cluster_settings, tmp_path):
    with pytest.raises(InvalidInput, match="t4, a100"):
        kube.submit_rayjob(cluster_settings, tmp_path / "concepts.yaml", TrainConfig(),
                           gpu="v100", namespace="ml")


def test_should_refuse_the_embedded_s3_that_pods_cannot_reach(tmp_path, fake_kube):
    with pytest.raises(InvalidInput, match="ATELIER_S3__ENDPOINT"):
        kube.submit_rayjob(Settings(home=tmp_path), tmp_path / "concepts.yaml", TrainConfig(),
                           gpu="t4", namespace="ml")


def test_should_refuse_more_cpus_per_worker_than_the_pool_offers(cluster_settings, tmp_path):
    with pytest.raises(InvalidInput, match="cpus_per_worker"):
        kube.submit_rayjob(cluster_settings, tmp_path / "concepts.yaml",
                           TrainConfig(cpus_per_worker=64), gpu="t4", namespace="ml")


# -- submission against a fake API server ----------------------------------------------------


class FakeKube:
    """Just enough of the Kubernetes API for RayJobs: list (fieldSelector on metadata.name),
    get, create with 409 on a duplicate, bearer-token checks and forced refusals; RayServices and
    ConfigMaps to get. A RayJob is created only if it passes KubeRay's CRD as the API server checks it (schema,
    CEL rules, unknown fields refused under fieldValidation=Strict: tests/kuberay.py), with the
    API server's status codes (422 Invalid, 400 for a strict decoding error). No real API server
    can run here."""

    PREFIX = "/apis/ray.io/v1/namespaces/"
    CORE = "/api/v1/namespaces/"

    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.configmaps: dict[tuple[str, str], dict[str, str]] = {}
        self.rayservices: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.refuse: int | None = None  # answer every request with this status
        self.token: str | None = None  # expected bearer token, when set
        self.crd_installed = True
        self.stale_list = False  # list answers from an empty cache (a create race)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle(self, "GET")

            def do_POST(self):
                fake.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def handle(self, http, method):
        url = urlsplit(http.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        length = int(http.headers.get("Content-Length") or 0)
        body = json.loads(http.rfile.read(length)) if length else None
        self.requests.append((method, url.path, query))
        if self.token and http.headers.get("Authorization") != f"Bearer {self.token}":
            return self.reply(http, *self.status(401, "Unauthorized", "Unauthorized"))
        if self.refuse:
            return self.reply(http, *self.status(self.refuse, "Forbidden",
                                                 f'rayjobs.ray.io is forbidden: {method}'))
        if url.path.startswith(self.CORE) and method == "GET":
            return self.configmap(http, url.path.removeprefix(self.CORE).split("/"))
        parts = url.path.removeprefix(self.PREFIX).split("/")
        if not url.path.startswith(self.PREFIX) or len(parts) not in (2, 3) \
                or parts[1] not in ("rayjobs", "rayservices") or not self.crd_installed:
            return self.reply(http, *self.status(404, "NotFound", "the server could not find "
                                                 "the requested resource"))
        namespace, name = parts[0], parts[2] if len(parts) == 3 else None
        if parts[1] == "rayservices" and method == "GET" and name:
            obj = self.rayservices.get((namespace, name))
            if obj is None:
                return self.reply(http, *self.status(404, "NotFound",
                                                     f'rayservices.ray.io "{name}" not found'))
            return self.reply(http, 200, obj)
        if method == "GET" and name:
            obj = self.objects.get((namespace, name))
            if obj is None:
                return self.reply(http, *self.status(404, "NotFound",
                                                     f'rayjobs.ray.io "{name}" not found'))
            return self.reply(http, 200, obj)
        if method == "GET":
            wanted = query.get("fieldSelector", "").removeprefix("metadata.name=") or None
            items = [] if self.stale_list else [
                o for (ns, n), o in self.objects.items()
                if ns == namespace and wanted in (None, n)]
            return self.reply(http, 200, {"apiVersion": "ray.io/v1", "kind": "RayJobList",
                                          "metadata": {}, "items": items})
        name = body["metadata"]["name"]
        if (namespace, name) in self.objects:
            return self.reply(http, *self.status(409, "AlreadyExists",
                                                 f'rayjobs.ray.io "{name}" already exists'))
        if kuberay.available():
            problems = kuberay.problems(body)
            unknown = kuberay.unknown_fields(problems)
            if unknown and query.get("fieldValidation") == "Strict":
                return self.reply(http, *self.status(400, "BadRequest",
                                                     f"strict decoding error: {', '.join(unknown)}"))
            if invalid := [p for p in problems if p not in unknown]:
                return self.reply(http, *self.status(
                    422, "Invalid", f'RayJob.ray.io "{name}" is invalid: {"; ".join(invalid)}'))
        self.objects[(namespace, name)] = body
        return self.reply(http, 201, body)

    def configmap(self, http, parts):
        if len(parts) != 3 or parts[1] != "configmaps":
            return self.reply(http, *self.status(404, "NotFound", "no such resource"))
        data = self.configmaps.get((parts[0], parts[2]))
        if data is None:
            return self.reply(http, *self.status(404, "NotFound",
                                                 f'configmaps "{parts[2]}" not found'))
        return self.reply(http, 200, {"apiVersion": "v1", "kind": "ConfigMap",
                                      "metadata": {"name": parts[2], "namespace": parts[0]},
                                      "data": data})

    @staticmethod
    def status(code, reason, message):
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                      "code": code, "reason": reason, "message": message}

    @staticmethod
    def reply(http, code, payload):
        data = json.dumps(payload).encode()
        http.send_response(code)
        http.send_header("Content-Type", "application/json")
        http.send_header("Content-Length", str(len(data)))
        http.end_headers()
        http.wfile.write(data)


def api_at(url: str):
    from kubernetes import client

    return client.CustomObjectsApi(client.ApiClient(client.Configuration(host=url)))


@pytest.fixture
def fake_kube(monkeypatch):
    fake = FakeKube()
    monkeypatch.setattr(kube_api, "connect", lambda settings: api_at(fake.url))
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def concepts_file(tmp_path_factory) -> Path:
    from atelier.catalogue.build import build_concepts
    from atelier.catalogue.synth import synth_shop
    from atelier.models.tokenizer import build_clip_tokenizer

    tmp = tmp_path_factory.mktemp("kube-shop")
    build_concepts(synth_shop(tmp / "shop"), tmp / "concepts.yaml", build_clip_tokenizer())
    return tmp / "concepts.yaml"


def created_spec(body: dict) -> TrainJobSpec:
    return TrainJobSpec.model_validate_json(shlex.split(body["spec"]["entrypoint"])[-1])


def bucket_is_empty(settings) -> bool:
    import boto3

    s3 = boto3.client("s3", endpoint_url=settings.s3.endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    return s3.list_objects_v2(Bucket=settings.s3.bucket).get("KeyCount", 0) == 0


def test_should_create_the_rendered_rayjob_on_the_cluster(settings, concepts_file, fake_kube):
    name = kube.submit_rayjob(settings, concepts_file, TrainConfig(num_workers=2), gpu="a100",
                              namespace="training", concepts=["studs"], run_name="shop-a100")
    assert name == "shop-a100"
    created = fake_kube.objects[("training", name)]
    spec = created_spec(created)
    assert spec.config.use_gpu is True and spec.config.gpu_type == "a100"
    assert spec.concepts == ["studs"] and spec.run_name == "shop-a100"
    assert created == kube.render_rayjob(spec, settings, "a100", name, "training")
    assert Storage(settings).has_manifest(spec.dataset_uri)
    (post,) = [r for r in fake_kube.requests if r[0] == "POST"]
    assert post[2].get("fieldValidation") == "Strict"


def test_should_submit_a_sweep_as_a_rayjob_whose_workers_hold_its_concurrent_trials(
        settings, concepts_file, fake_kube):
    from atelier.training.sweep import Promotion, SweepConfig, SweepSpec, submit_sweep_rayjob

    sweep = SweepConfig(metric="clip_i", max_concurrent=3, train={
        "eval_encoder": "shop-clip", "num_workers": 2, "learning_rate": {"grid": [1e-5, 1e-4]}})
    promote = Promotion(alias="prod", promote_if="clip_i > 0.5")
    name = submit_sweep_rayjob(settings, concepts_file, sweep, gpu="a100", namespace="training",
                               concepts=["studs"], name="shop-sweep", promote=promote)
    created = fake_kube.objects[("training", name)]  # the fake let it pass KubeRay's CRD
    args = shlex.split(created["spec"]["entrypoint"])
    assert args[:3] == ["python", "-m", "atelier_jobs.sweep"]
    spec = SweepSpec.model_validate_json(args[-1])
    assert spec.sweep == sweep and spec.promote == promote
    assert spec.job.run_name == "shop-sweep" and spec.job.concepts == ["studs"]
    assert spec.job.config.use_gpu and spec.job.config.gpu_type == "a100"
    assert Storage(settings).has_manifest(spec.job.dataset_uri)
    # Three trials of two DDP workers each, at once.
    assert workers_of(created)["replicas"] == workers_of(created)["minReplicas"] == 6
    assert workers_of(created)["maxReplicas"] == 6


def test_should_refuse_a_sweeps_bad_alias_before_uploading_anything(settings, concepts_file, fake_kube):
    from atelier.training.sweep import Promotion, SweepConfig, submit_sweep_rayjob

    sweep = SweepConfig(metric="clip_i", train={"eval_encoder": "shop-clip",
                                                "learning_rate": {"grid": [1e-5, 1e-4]}})
    with pytest.raises(InvalidInput):
        submit_sweep_rayjob(settings, concepts_file, sweep, gpu="t4", namespace="ml",
                            promote=Promotion(alias="Not An Alias!"))
    assert bucket_is_empty(settings) and not fake_kube.objects


def test_should_refuse_a_run_whose_rayjob_exists_before_uploading_anything(
        settings, concepts_file, fake_kube):
    fake_kube.objects[("ml", "shop-1")] = {"metadata": {"name": "shop-1"}}
    with pytest.raises(InvalidInput, match="already exists"):
        kube.submit_rayjob(settings, concepts_file, TrainConfig(), gpu="t4", namespace="ml",
                           run_name="shop-1")
    assert not [r for r in fake_kube.requests if r[0] == "POST"]
    assert bucket_is_empty(settings)


def test_should_refuse_a_duplicate_the_api_server_answers_409_to(settings, concepts_file,
                                                                 fake_kube):
    kube.submit_rayjob(settings, concepts_file, TrainConfig(), gpu="t4", namespace="ml",
                       run_name="shop-2")
    fake_kube.stale_list = True
    with pytest.raises(InvalidInput, match="already exists") as raised:
        kube.submit_rayjob(settings, concepts_file, TrainConfig(), gpu="t4", namespace="ml",
                           run_name="shop-2")
    assert "kubectl delete rayjob shop-2 -n ml" in str(raised.value)


def test_should_read_back_the_status_the_operator_reports(settings, concepts_file, fake_kube):
    name = kube.submit_rayjob(settings, concepts_file, TrainConfig(), gpu="t4", namespace="ml",
                              run_name="shop-3")
    assert kube.rayjob_status(settings, name, "ml") == {
        "jobStatus": None, "jobDeploymentStatus": None, "message": None,
        "startTime": None, "endTime": None}
    fake_kube.objects[("ml", name)]["status"] = {
        "jobStatus": "RUNNING", "jobDeploymentStatus": "Running",
        "startTime": "2026-01-01T12:00:00Z", "rayClusterName": f"{name}-abcde"}
    assert kube.rayjob_status(settings, name, "ml") == {
        "jobStatus": "RUNNING", "jobDeploymentStatus": "Running", "message": None,
        "startTime": "2026-01-01T12:00:00Z", "endTime": None}


def test_should_say_not_found_for_an_unknown_rayjob(cluster_settings, fake_kube):
    with pytest.raises(NotFound, match="ml/nobody"):
        kube.rayjob_status(cluster_settings, "nobody", "ml")


def test_should_name_the_missing_permission_before_uploading_anything(settings, concepts_file,
                                                                     fake_kube):
    fake_kube.refuse = 403
    with pytest.raises(ServiceError, match="forbidden to list rayjobs.ray.io") as raised:
        kube.submit_rayjob(settings, concepts_file, TrainConfig(), gpu="t4", namespace="ml")
    assert "namespace ml" in str(raised.value)
    assert bucket_is_empty(settings)


def test_should_say_when_the_cluster_has_no_kuberay(settings, concepts_file, fake_kube):
    fake_kube.crd_installed = False
    with pytest.raises(ServiceError, match="install the KubeRay operator"):
        kube.submit_rayjob(settings, concepts_file, TrainConfig(), gpu="t4", namespace="ml")


def test_should_fail_clearly_when_no_cluster_answers(cluster_settings, monkeypatch):
    closed = FakeKube()
    closed.close()
    monkeypatch.setattr(kube_api, "connect", lambda settings: api_at(closed.url))
    with pytest.raises(ServiceError, match="cannot reach the Kubernetes API"):
        kube.rayjob_status(cluster_settings, "shop", "ml")


def test_should_fail_clearly_without_a_kubeconfig_or_a_service_account(
        cluster_settings, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ServiceError, match="no usable Kubernetes configuration"):
        kube.rayjob_status(cluster_settings, "shop", "ml")


def test_should_use_the_kubeconfig_context_named_in_settings(cluster_settings, monkeypatch,
                                                              tmp_path):
    fake = FakeKube()
    closed = FakeKube()
    closed.close()
    try:
        fake.token = "fake-token"
        fake.objects[("ml", "shop")] = {"metadata": {"name": "shop"},
                                        "status": {"jobDeploymentStatus": "Complete"}}
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "current-context": "elsewhere",
            "clusters": [{"name": "fake", "cluster": {"server": fake.url}},
                         {"name": "closed", "cluster": {"server": closed.url}}],
            "users": [{"name": "me", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}},
                         {"name": "elsewhere", "context": {"cluster": "closed", "user": "me"}}],
        }
        (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        settings = cluster_settings.model_copy(
            update={"kube": cluster_settings.kube.model_copy(update={"context": "fake"})})
        assert kube.rayjob_status(settings, "shop", "ml")["jobDeploymentStatus"] == "Complete"
        fake.token = "another-token"
        with pytest.raises(ServiceError, match="refused the credentials"):
            kube.rayjob_status(settings, "shop", "ml")
    finally:
        fake.close()


def test_should_print_a_rayjobs_status_from_the_cli(fake_kube, capsys):
    from atelier.cli.main import main

    fake_kube.objects[("ml", "shop")] = {"metadata": {"name": "shop"}, "status": {
        "jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}}
    assert main(["train", "status", "--kube", "--namespace", "ml", "shop"]) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and "Complete" in out
    assert main(["train", "status", "--kube", "--namespace", "ml", "nobody"]) == NotFound.exit_code


def test_should_refuse_a_rayjob_the_crd_refuses_with_the_api_servers_message(
        settings, concepts_file, fake_kube, crds, monkeypatch):
    real = kube.submit.render_rayjob

    def breaking_a_cel_rule(*args, **kwargs):
        body = real(*args, **kwargs)
        body["spec"]["managedBy"] = "someone-else"
        return body

    monkeypatch.setattr(kube.submit, "render_rayjob", breaking_a_cel_rule)
    with pytest.raises(ServiceError, match="422: .*managedBy field value must be"):
        kube.submit_rayjob(settings, concepts_file, TrainConfig(), gpu="t4", namespace="ml")
    assert not fake_kube.objects


def test_should_refuse_an_unknown_field_because_it_submits_strictly(
        settings, concepts_file, fake_kube, crds, monkeypatch):
    real = kube.submit.render_rayjob

    def with_a_typo(*args, **kwargs):
        body = real(*args, **kwargs)
        body["spec"]["shutdownAfterJobFinish"] = True
        return body

    monkeypatch.setattr(kube.submit, "render_rayjob", with_a_typo)
    with pytest.raises(ServiceError, match="400: strict decoding error: "
                       "/spec/shutdownAfterJobFinish: unknown field"):
        kube.submit_rayjob(settings, concepts_file, TrainConfig(), gpu="t4", namespace="ml")


def test_should_take_what_the_user_did_not_set_from_the_charts_settings_configmap(
        settings, concepts_file, fake_kube, crds, tmp_path):
    # A user whose only settings are S3 keys: the endpoint, bucket, image, Secrets and service
    # account come from the installation, as `helm install atelier` wrote them.
    user = Settings(home=tmp_path / "user", s3=S3Settings(
        credentials_file=settings.s3.credentials_file))
    fake_kube.configmaps[("ml", "atelier-settings")] = {
        "ATELIER_S3__ENDPOINT": settings.s3.endpoint, "ATELIER_S3__BUCKET": settings.s3.bucket,
        "ATELIER_S3__REGION": "us-east-1", "ATELIER_KUBE__IMAGE": "registry.example/atelier:1",
        "ATELIER_KUBE__S3_SECRET": "atelier-s3", "ATELIER_KUBE__SERVICE_ACCOUNT": "atelier-ray",
        "ATELIER_KUBE__RAY_VERSION": "2.60.0", "ATELIER_KUBE__RAY_TOKEN_SECRET": "atelier-ray-token",
        "ATELIER_KUBE__FROM_A_NEWER_CHART": "ignored"}
    said: list[str] = []
    name = kube.submit_rayjob(user, concepts_file, TrainConfig(), gpu="t4", namespace="ml",
                              run_name="from-the-chart", said=said.append)
    body = fake_kube.objects[("ml", name)]
    cluster = body["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "atelier-ray-token"}
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == "atelier-ray"
    assert head["containers"][0]["image"] == "registry.example/atelier:1"
    assert head["containers"][0]["envFrom"] == [{"secretRef": {"name": "atelier-s3"}}]
    assert Storage(settings).has_manifest(created_spec(body).dataset_uri)
    assert said == ["from ConfigMap ml/atelier-settings: kube.image, kube.ray_token_secret, "
                    "kube.ray_version, kube.s3_secret, kube.service_account, s3.bucket, "
                    "s3.endpoint, s3.region"]


def test_should_let_what_the_user_set_win_over_the_configmap(settings, concepts_file, fake_kube,
                                                            crds):
    fake_kube.configmaps[("ml", "atelier-settings")] = {
        "ATELIER_S3__ENDPOINT": "http://unreachable.invalid:9000",
        "ATELIER_KUBE__IMAGE": "registry.example/atelier:1"}
    said: list[str] = []
    name = kube.submit_rayjob(settings, concepts_file, TrainConfig(), gpu="t4", namespace="ml",
                              said=said.append)
    head = fake_kube.objects[("ml", name)]["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"] == "registry.example/atelier:1"
    assert said == ["from ConfigMap ml/atelier-settings: kube.image"]
    assert Storage(settings).has_manifest(
        created_spec(fake_kube.objects[("ml", name)]).dataset_uri)


def test_should_refuse_an_invalid_configmap_value_with_its_place(settings, concepts_file,
                                                                 fake_kube):
    fake_kube.configmaps[("ml", "atelier-settings")] = {"ATELIER_STACK__S3_PORT": "not-a-port"}
    with pytest.raises(InvalidInput, match="ml/atelier-settings"):
        kube.submit_rayjob(settings, concepts_file, TrainConfig(), gpu="t4", namespace="ml")


UPGRADING = {  # a RayService's status as KubeRay 1.7 writes it, mid-upgrade to a new cluster
    "serviceStatus": "Running", "numServeEndpoints": 2,
    "conditions": [
        {"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": "",
         "lastTransitionTime": "2026-01-01T12:00:00Z"},
        {"type": "UpgradeInProgress", "status": "True", "reason": "BothActivePendingClustersExist",
         "message": "", "lastTransitionTime": "2026-01-01T12:05:00Z"}],
    "activeServiceStatus": {"rayClusterName": "atelier-abcde", "applicationStatuses": {
        "atelier-t4": {"status": "RUNNING", "serveDeploymentStatuses": {
            "Ingress": {"status": "HEALTHY"}, "StableDiffusion": {"status": "UPSCALING"}}}}},
    "pendingServiceStatus": {"rayClusterName": "atelier-fghij"},
}


def test_should_read_the_charts_rayservice_status_as_kuberay_writes_it(fake_kube, crds):
    body = {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": "atelier", "namespace": "ml"},
            "spec": {"rayClusterConfig": {"headGroupSpec": {"rayStartParams": {}, "template": {
                "spec": {"containers": [{"name": "ray-head", "image": "i"}]}}}}},
            "status": UPGRADING}
    assert kuberay.problems(body) == []  # the fixture is a status the CRD admits
    fake_kube.rayservices[("ml", "atelier")] = body
    assert kube.rayservice_status(Settings(), "atelier", "ml") == {
        "ready": True, "reason": "NonZeroServeEndpoints", "cluster": "atelier-abcde",
        "upgrading_to": "atelier-fghij", "endpoints": 2, "applications": [
            ("atelier-t4", "RUNNING", "Ingress", "HEALTHY"),
            ("atelier-t4", "RUNNING", "StableDiffusion", "UPSCALING")]}


def test_should_say_why_a_rayservice_does_not_serve_yet(fake_kube):
    fake_kube.rayservices[("ml", "atelier")] = {"metadata": {"name": "atelier"}, "status": {
        "conditions": [{"type": "Ready", "status": "False", "reason": "Initializing"}]}}
    found = kube.rayservice_status(Settings(), "atelier", "ml")
    assert (found["ready"], found["reason"], found["applications"]) == (False, "Initializing", [])


def test_should_print_the_rayservice_status_and_name_a_missing_one(fake_kube, capsys):
    from atelier.cli.main import main

    fake_kube.rayservices[("ml", "atelier")] = {"metadata": {"name": "atelier"},
                                                "status": UPGRADING}
    assert main(["serve", "status", "--kube", "--namespace", "ml"]) == 0
    out = capsys.readouterr().out
    assert "RayService ml/atelier: ready, cluster atelier-abcde, 2 Serve endpoints" in out
    assert "upgrading to the cluster atelier-fghij" in out and "UPSCALING" in out
    assert main(["serve", "status", "--kube", "--namespace", "ml", "--name", "shop"]) == \
        NotFound.exit_code
    assert "ml/shop: no such RayService" in capsys.readouterr().err
