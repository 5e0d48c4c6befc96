"""The Helm chart (charts/atelier) rendered by the real helm, both majors where present: what it
makes for each set of values, checked against the CLI's own serveConfigV2, the pools table and the
KubeRay CRD's schema and CEL rules (tests/kuberay.py).

helm is found in ATELIER_HELM (one or more paths, separated by os.pathsep) or in .tools/helm-v3 and
.tools/helm-v4 of the repository (`make tools` puts them there); without any, the helm tests skip
and say so.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

import kuberay
from atelier import __version__, pools
from atelier.kube import chart
from support import CHECKOV_EXPLAINED, REPO, checkov_failures

CHART = REPO / chart.CHART


def _helms() -> dict[str, Path]:
    """Major version ("v3", "v4") -> helm binary."""
    candidates = [Path(p) for p in os.environ.get("ATELIER_HELM", "").split(os.pathsep) if p]
    candidates += [REPO / ".tools" / f"helm-{major}" / "helm" for major in ("v3", "v4")]
    found: dict[str, Path] = {}
    for path in candidates:
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        version = subprocess.run([str(path), "version", "--short"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
        found.setdefault(version.split(".")[0], path)
    return found


HELMS = _helms()
NO_HELM = "no helm binary: run `make tools`, or set ATELIER_HELM"
if os.environ.get("CI") and sorted(HELMS) != ["v3", "v4"]:
    # `make test` fetches both majors first: in CI a missing one is a failure, never a skip.
    raise RuntimeError(f"{NO_HELM} (found: {sorted(HELMS) or 'none'})")
helm = pytest.mark.parametrize(
    "major", sorted(HELMS) or [pytest.param("none", marks=pytest.mark.skip(reason=NO_HELM))])

# Named sets of values, as a user would write them in a values file.
T4_ONLY: dict[str, Any] = {"pools": {"t4": {"enabled": True}}}
A100_ONLY = {"pools": {"t4": {"enabled": False}, "a100": {"enabled": True}}}
BOTH = {"pools": {"t4": {"enabled": True}, "a100": {"enabled": True}}}
CPU_DEV = {"pools": {"t4": {"enabled": False}, "cpu": {"enabled": True}},
           "storage": {"endpoint": "http://seaweedfs.storage:8333"}}
INGRESS = {"ingress": {"enabled": True, "className": "nginx", "host": "atelier.example.com",
                       "tls": {"enabled": True}}}
SCALE_TO_ZERO = {"pools": {"t4": {"minReplicas": 0}},
                 "serve": {"pools": {"t4": {"autoscaling": {"min_replicas": 0}}}}}
CREATED_SECRETS = {"storage": {"credentials": {"create": True, "accessKeyId": "AKIAEXAMPLE",
                                               "secretAccessKey": "not-a-real-key"}},
                   "apiKeys": {"create": True, "keys": ["key-one", "key-two"]}}
MONITORING = {"monitoring": {"podMonitor": {"enabled": True}, "dashboard": {"enabled": True}}}
MATRIX = {"defaults": {}, "t4 only": T4_ONLY, "a100 only": A100_ONLY, "both": BOTH,
          "cpu-only dev": CPU_DEV, "ingress": INGRESS, "scale to zero": SCALE_TO_ZERO,
          "created secrets": CREATED_SECRETS, "monitoring": MONITORING}
# Values the schema must refuse, with the key its message names.
BAD_VALUES = {
    "a string for a number": ({"pools": {"t4": {"maxReplicas": "4"}}}, "maxReplicas"),
    "an unknown top-level key": ({"replicaCount": 2}, "replicaCount"),
    "a negative replica count": ({"pools": {"t4": {"minReplicas": -1}}}, "minReplicas"),
    "a negative serve replica count": (
        {"serve": {"pools": {"t4": {"autoscaling": {"min_replicas": -1}}}}}, "min_replicas"),
    "a misspelt nested key": ({"ingress": {"hostname": "atelier.example.com"}}, "hostname"),
}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of a values file over the chart's: maps merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def chart_values(over: dict[str, Any]) -> dict[str, Any]:
    return merged(yaml.safe_load((CHART / "values.yaml").read_text()), over)


@cache
def _run(major: str, command: str, values_json: str) -> subprocess.CompletedProcess:
    args = [str(HELMS[major]), command]
    args += ["release", str(CHART), "--namespace", "ml"] if command == "template" else [str(CHART)]
    if command == "lint":
        args.append("--strict")
    # A values file rather than --set, so that types stay as written.
    with tempfile.NamedTemporaryFile("w", suffix=".json") as values:
        values.write(values_json)
        values.flush()
        return subprocess.run([*args, "--values", values.name], capture_output=True, text=True,
                              timeout=120)


def render(major: str, over: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's objects for `over`; fails the test with helm's message when it does not render."""
    result = _run(major, "template", json.dumps(over, sort_keys=True))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(major: str, over: dict[str, Any]) -> str:
    result = _run(major, "template", json.dumps(over, sort_keys=True))
    assert result.returncode != 0, "the chart rendered values it should refuse"
    return result.stderr


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def rayservice(major: str, over: dict[str, Any]) -> dict[str, Any]:
    return one(render(major, over), "RayService")


def worker_groups(major: str, over: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = rayservice(major, over)["spec"]["rayClusterConfig"]
    return {group["groupName"]: group for group in spec["workerGroupSpecs"]}


def ray_pods(major: str, over: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice(major, over)["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"],
            *(group["template"]["spec"] for group in cluster["workerGroupSpecs"])]


# -- one source ------------------------------------------------------------------------------------
def test_values_yaml_should_hold_what_make_generate_writes():
    text = (CHART / "values.yaml").read_text()
    assert chart.values_yaml(text) == text, "charts/atelier/values.yaml drifted: run `make generate`"


def test_the_pools_of_the_values_should_be_the_pools_table():
    values = chart_values({})
    assert list(values["pools"]) == list(pools.POOLS)
    for name, node in pools.POOLS.items():
        pool = values["pools"][name]
        assert pool["nodeSelector"] == node.node_selector()
        assert pool["tolerations"] == node.tolerations()
        assert pool["resources"] == node.resources()


def test_the_chart_should_carry_atelier_s_version():
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"] == __version__


def test_every_value_should_be_documented():
    """Every leaf of values.yaml has its `## @param` line (what the README table is made from)."""
    text = (CHART / "values.yaml").read_text()
    documented = {line.split()[2] for line in text.splitlines()
                  if line.strip().startswith("## @param")}

    def leaves(data: dict[str, Any], prefix: str = "") -> set[str]:
        out = set()
        for key, value in data.items():
            path = f"{prefix}{key}"
            out |= {path} if path in documented or not isinstance(value, dict) or not value \
                else leaves(value, f"{path}.")
        return out

    assert leaves(chart_values({})) - documented == set()


def test_the_schema_should_hold_every_documented_value_with_its_default():
    """values.schema.json is current with values.yaml (`make generate` rewrites both; this catches
    a values.yaml edited without it, with no node on the machine)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = chart_values({})
    text = (CHART / "values.yaml").read_text()
    for path in (line.split()[2] for line in text.splitlines()
                 if line.strip().startswith("## @param")):
        node, value = schema, values
        for key in path.split("."):
            node, value = node["properties"][key], value[key]
        assert node["default"] == value, path


def test_the_schema_should_refuse_unknown_keys_at_every_documented_level():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def open_objects(node: dict[str, Any], path: str) -> list[str]:
        out = [path] if "properties" in node and node.get("additionalProperties") is not False \
            else []
        for key, child in node.get("properties", {}).items():
            out += open_objects(child, f"{path}.{key}".lstrip("."))
        return out

    assert open_objects(schema, "") == []


# -- helm ------------------------------------------------------------------------------------------
@helm
@pytest.mark.parametrize("command", ["lint", "template"])
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_the_chart_should_refuse_values_with(major, command, case):
    over, key = BAD_VALUES[case]
    result = _run(major, command, json.dumps(over, sort_keys=True))
    assert result.returncode != 0, f"helm {command} took {case}"
    assert key in result.stdout + result.stderr


@helm
@pytest.mark.parametrize("case", list(MATRIX))
def test_the_chart_should_lint_strictly_and_render(major, case):
    lint = _run(major, "lint", json.dumps(MATRIX[case], sort_keys=True))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    kinds = {doc["kind"] for doc in render(major, MATRIX[case])}
    assert {"RayService", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"} <= kinds


@helm
@pytest.mark.parametrize("case", list(MATRIX))
def test_serve_config_v2_should_be_what_the_cli_writes_for_the_same_settings(major, case):
    rendered = yaml.safe_load(rayservice(major, MATRIX[case])["spec"]["serveConfigV2"])
    expected = chart.serve_config(chart_values(MATRIX[case]))
    # helm keeps numbers as floats (8000.0 renders 8000): compare as JSON values.
    assert json.loads(json.dumps(rendered)) == json.loads(json.dumps(expected))


@helm
def test_should_select_t4_nodes_when_only_the_t4_pool_is_enabled(major):
    groups = worker_groups(major, T4_ONLY)
    assert list(groups) == ["t4"]
    pod = groups["t4"]["template"]["spec"]
    assert pod["nodeSelector"] == {pools.ACCELERATOR_LABEL: "nvidia-tesla-t4"}
    assert pod["tolerations"] == [pools.GPU_TOLERATION]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


@helm
def test_should_select_a100_nodes_when_only_the_a100_pool_is_enabled(major):
    groups = worker_groups(major, A100_ONLY)
    assert list(groups) == ["a100"]
    assert groups["a100"]["template"]["spec"]["nodeSelector"] == {
        pools.ACCELERATOR_LABEL: "nvidia-tesla-a100"}
    applications = yaml.safe_load(rayservice(major, A100_ONLY)["spec"]["serveConfigV2"])
    assert [app["args"]["gpu"] for app in applications["applications"]] == ["a100"]


@helm
def test_should_serve_each_pool_under_its_own_route_when_both_gpus_are_enabled(major):
    assert set(worker_groups(major, BOTH)) == {"t4", "a100"}
    document = yaml.safe_load(rayservice(major, BOTH)["spec"]["serveConfigV2"])
    routes = {app["args"]["gpu"]: (app["name"], app["route_prefix"])
              for app in document["applications"]}
    assert routes == {"t4": ("atelier-t4", "/t4"), "a100": ("atelier-a100", "/a100")}


@helm
def test_should_run_cpu_workers_without_gpus_or_selectors_on_a_dev_cluster(major):
    group = worker_groups(major, CPU_DEV)["cpu"]
    pod = group["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]


@helm
def test_should_let_a_pool_scale_to_zero_with_the_ray_autoscaler(major):
    cluster = rayservice(major, SCALE_TO_ZERO)["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    group = cluster["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (0, 0, 4)


@helm
def test_should_refuse_a_cluster_without_any_pool(major):
    off = {"pools": {name: {"enabled": False} for name in pools.POOLS}}
    assert "enable at least one pool" in render_error(major, off)


@helm
def test_should_close_ray_with_a_token_from_a_secret_named_auth_token(major):
    docs = render(major, {})
    auth = one(docs, "RayService")["spec"]["rayClusterConfig"]["authOptions"]
    assert auth["mode"] == "token"
    secret = next(doc for doc in docs if doc["kind"] == "Secret"
                  and doc["metadata"]["name"] == auth["secretName"])
    assert len(secret["data"]["auth_token"]) > 40


@helm
def test_should_use_an_existing_ray_token_secret_without_creating_one(major):
    docs = render(major, {"ray": {"auth": {"existingSecret": "my-token"}}})
    assert one(docs, "RayService")["spec"]["rayClusterConfig"]["authOptions"]["secretName"] == \
        "my-token"
    assert not [doc for doc in docs if doc["kind"] == "Secret"]


@helm
def test_should_run_every_ray_container_unprivileged_with_requests_and_limits(major):
    for pod in ray_pods(major, BOTH):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]


@helm
def test_should_take_s3_keys_only_from_a_secret(major):
    docs = render(major, {})
    assert not [doc for doc in docs if doc["kind"] == "Secret"
                and "AWS_SECRET_ACCESS_KEY" in doc.get("data", {})]
    settings = one(docs, "ConfigMap")["data"]
    assert not [key for key in settings if "KEY" in key or "SECRET_ACCESS" in key]
    for pod in ray_pods(major, {}):
        container = pod["containers"][0]
        assert {"secretRef": {"name": "atelier-s3"}} in container["envFrom"]
        assert not [env for env in container["env"] if env["name"].startswith("AWS_")]


@helm
def test_should_create_the_s3_and_api_key_secrets_only_when_asked(major):
    docs = render(major, CREATED_SECRETS)
    names = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "Secret"}
    assert {"release-atelier-s3", "release-atelier-api-keys"} <= names
    assert one(docs, "ConfigMap")["data"]["ATELIER_KUBE__S3_SECRET"] == "release-atelier-s3"


@helm
def test_should_give_the_cli_its_storage_and_image_settings_in_a_config_map(major):
    settings = one(render(major, CPU_DEV), "ConfigMap")["data"]
    assert settings["ATELIER_S3__ENDPOINT"] == "http://seaweedfs.storage:8333"
    assert settings["ATELIER_KUBE__IMAGE"] == f"ghcr.io/atelier/atelier:{__version__}-gpu"
    assert settings["ATELIER_KUBE__SERVICE_ACCOUNT"] == "release-atelier-ray"
    assert settings["ATELIER_KUBE__RAY_TOKEN_SECRET"] == "release-atelier-ray-token"


@helm
def test_every_key_of_the_settings_config_map_should_be_a_setting_the_cli_reads(major):
    from atelier.settings import Settings

    for key in one(render(major, CPU_DEV), "ConfigMap")["data"]:
        section, _, field = key.removeprefix("ATELIER_").lower().partition("__")
        assert key.startswith("ATELIER_") and field in Settings.model_fields[section].annotation \
            .model_fields, key


@helm
def test_should_let_the_submitter_manage_rayjobs_in_the_namespace(major):
    docs = render(major, {})
    rules = one(docs, "Role")["rules"]
    assert {"apiGroups": ["ray.io"], "resources": ["rayjobs"],
            "verbs": ["create", "get", "list", "watch", "delete"]} in rules
    binding = one(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "release-atelier-submitter",
                                    "namespace": "ml"}]


@helm
def test_should_route_the_ingress_to_the_serve_service_kuberay_creates(major):
    docs = render(major, INGRESS)
    spec = one(docs, "Ingress")["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"hosts": ["atelier.example.com"], "secretName": "release-atelier-tls"}]
    backend = spec["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "release-atelier-serve-svc", "port": {"number": 8000}}


@helm
def test_should_name_the_serve_service_the_ingress_routes_to(major):
    docs = render(major, {**INGRESS, "service": {"type": "LoadBalancer",
                                                 "annotations": {"example.com/lb": "internal"}}})
    service = one(docs, "RayService")["spec"]["serveService"]
    backend = one(docs, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert service["metadata"]["name"] == backend["name"]
    assert service["metadata"]["annotations"] == {"example.com/lb": "internal"}
    assert service["spec"]["type"] == "LoadBalancer"
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == \
        [("serve", backend["port"]["number"])]
    assert "selector" not in service["spec"]  # KubeRay selects the pods with a Serve proxy


def notes(over: dict[str, Any]) -> str:
    """NOTES.txt as `helm install` prints it. Only helm v4 renders it without a cluster
    (`--dry-run=client`); v3 asks the cluster for its version first."""
    if "v4" not in HELMS:
        pytest.skip("NOTES.txt renders offline only with helm v4")
    with tempfile.NamedTemporaryFile("w", suffix=".json") as values:
        values.write(json.dumps(over))
        values.flush()
        out = subprocess.run([str(HELMS["v4"]), "install", "atelier", str(CHART), "--namespace",
                              "ml", "--dry-run=client", "--values", values.name],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\nNOTES:\n", 1)[1]


def test_the_notes_first_curl_should_post_to_a_route_the_api_has():
    from atelier_serve.openapi import OPENAPI

    text = notes({})
    url = re.search(r"\$ATELIER_URL(/\S+)\s*$", text.split("curl -sS", 1)[1], re.M).group(1)
    pool, path = url.split("/", 2)[1:]
    assert pool == "t4"
    assert "post" in json.loads((REPO / OPENAPI).read_text())["paths"][f"/{path}"]
    assert "port-forward svc/atelier-serve-svc 8000:8000" in text
    assert "--namespace ml" in text and "ATELIER_KUBE__SETTINGS_CONFIGMAP" not in text


def test_the_notes_should_give_a_load_balancers_address_and_a_renamed_releases_configmap():
    text = notes({"service": {"type": "LoadBalancer"}, "fullnameOverride": "shop"})
    assert "get svc shop-serve-svc -o jsonpath='{.status.loadBalancer.ingress[0].ip}'" in text
    assert "ATELIER_KUBE__SETTINGS_CONFIGMAP=shop-settings" in text


@helm
def test_should_make_no_ingress_unless_enabled(major):
    assert not [doc for doc in render(major, {}) if doc["kind"] == "Ingress"]


@helm
def test_should_keep_a_worker_of_each_pool_through_a_drain(major):
    budgets = [doc for doc in render(major, BOTH) if doc["kind"] == "PodDisruptionBudget"]
    assert sorted(b["spec"]["selector"]["matchLabels"]["atelier.dev/gpu"] for b in budgets) == \
        ["a100", "t4"]
    assert all(b["spec"]["minAvailable"] == 1 for b in budgets)


@helm
def test_should_admit_only_the_ingress_controller_to_the_serve_port_when_asked(major):
    policy = one(render(major, {"networkPolicy": {"enabled": True}}), "NetworkPolicy")["spec"]
    serve_rules = [rule for rule in policy["ingress"]
                   if rule.get("ports") == [{"port": 8000, "protocol": "TCP"}]]
    assert len(serve_rules) == 1
    assert serve_rules[0]["from"][0]["namespaceSelector"]


# -- the KubeRay CRD ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crds():
    """KubeRay 1.7's CRDs, for checks made as the API server makes them (tests/kuberay.py)."""
    if not kuberay.available():
        pytest.skip(kuberay.MISSING)


@helm
@pytest.mark.parametrize("case", list(MATRIX))
def test_the_rayservice_should_pass_the_kuberay_crd_schema_and_its_cel_rules(major, case, crds):
    assert kuberay.problems(rayservice(major, MATRIX[case])) == []


@helm
def test_an_upgrade_should_pass_the_crds_transition_rules(major, crds):
    assert kuberay.problems(rayservice(major, BOTH), old=rayservice(major, {})) == []


@helm
def test_the_crd_check_should_refuse_an_unknown_field(major, crds):
    body = rayservice(major, {})
    body["spec"]["rayClusterConfig"]["authOptions"]["secretNmae"] = "typo"
    assert kuberay.problems(body) == ["/spec/rayClusterConfig/authOptions/secretNmae: unknown field"]


# -- Kubernetes' own kinds ---------------------------------------------------------------------------
def _kube_versions() -> list[str]:
    """The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest that
    kubernetes-validate knows."""
    import kubernetes_validate

    oldest = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    return [oldest.removeprefix(">=").removesuffix("-0"), kubernetes_validate.latest_version()]


def built_in(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Objects of Kubernetes' own kinds (kubernetes-validate passes a kind it does not know, so
    custom resources are checked elsewhere)."""
    custom = ("ray.io/", "monitoring.coreos.com/")
    return [doc for doc in docs if not doc["apiVersion"].startswith(custom)]


@helm
@pytest.mark.parametrize("kube_version", _kube_versions())
@pytest.mark.parametrize("case", list(MATRIX))
def test_every_built_in_object_should_pass_kubernetes_strict_schema(major, kube_version, case):
    import kubernetes_validate

    docs = built_in(render(major, MATRIX[case]))
    assert {doc["kind"] for doc in docs} >= {"ConfigMap", "Role", "RoleBinding", "ServiceAccount"}
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at "
                            f"{'.'.join(map(str, e.path))}")
    assert problems == []


def test_the_strict_kubernetes_check_should_refuse_an_unknown_field():
    import kubernetes_validate

    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "x"}, "rules": [{"apiGroups": [""], "resource": ["pods"],
                                                  "verbs": ["get"]}]}
    with pytest.raises(kubernetes_validate.ValidationError, match="resource"):
        kubernetes_validate.validate(role, _kube_versions()[-1], strict=True)


# -- checkov ---------------------------------------------------------------------------------------
def test_checkov_should_leave_no_finding_on_the_chart_unexplained(tmp_path):
    major = sorted(HELMS)[0] if HELMS else pytest.skip(NO_HELM)
    everything = merged(merged(merged(merged(BOTH, INGRESS), CREATED_SECRETS), MONITORING),
                        {"networkPolicy": {"enabled": True}})
    failed, report = checkov_failures(render(major, everything), tmp_path)
    assert report["resource_count"] > 10
    assert sorted(f for f in failed if f[0] not in CHECKOV_EXPLAINED) == []
    assert sorted(set(CHECKOV_EXPLAINED) - {check for check, _ in failed}) == []


def test_the_rayjobs_pods_should_run_as_securely_as_the_charts():
    from atelier.kube.render import CONTAINER_SECURITY, POD_SECURITY

    values = chart_values({})
    assert values["podSecurityContext"] == POD_SECURITY
    assert values["containerSecurityContext"] == CONTAINER_SECURITY
