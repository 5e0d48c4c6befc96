"""The GKE Terraform in infra/: it parses, its node pools are atelier.pools' pools (labels, GPUs,
taints, scale from zero), its outputs are what the chart's values need, and checkov finds nothing
left unexplained. No terraform binary can be installed here, so nothing is planned or applied.

python-hcl2's `hcl2tojson` (a dev extra) and `checkov` (in .tools/checkov, `make tools`: kept out of
the environment that has python-hcl2, because its pinned fork `bc-python-hcl2` installs a module of
the same name over it) are found by support.tool; without them the tests skip and say so, and fail
under CI.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from atelier.pools import ACCELERATOR_LABEL, GPU_POOLS, GPU_TOLERATION, POOLS
from support import REPO, tool

CHECKOV_HINT = "run `make tools` (PyPI checkov in .tools/checkov)"
INFRA = REPO / "infra"
TF_FILES = sorted(INFRA.glob("*.tf"))
# Terraform's taint effects, as Kubernetes spells them.
EFFECTS = {"NO_SCHEDULE": "NoSchedule", "PREFER_NO_SCHEDULE": "PreferNoSchedule",
           "NO_EXECUTE": "NoExecute"}


@pytest.fixture(scope="module")
def tf() -> dict[str, dict]:
    """Every .tf file of infra/ as python-hcl2 reads it, by file name."""
    hcl2tojson = tool("hcl2tojson", "install the dev extras (PyPI python-hcl2)")
    parsed = {}
    for path in TF_FILES:
        out = subprocess.run([hcl2tojson, "-q", "--strip-string-quotes", str(path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{path.name} does not parse: {out.stderr}"
        parsed[path.name] = json.loads(out.stdout)
    return parsed


def blocks(tf: dict[str, dict], kind: str) -> list[dict]:
    return [block for doc in tf.values() for block in doc.get(kind, [])]


def resource(tf: dict[str, dict], type_: str, name: str) -> dict:
    found = [r[type_][name] for r in blocks(tf, "resource") if name in r.get(type_, {})]
    assert len(found) == 1, f"{type_}.{name}: {len(found)} definitions"
    return found[0]


def local(tf: dict[str, dict], name: str):
    found = [block[name] for block in blocks(tf, "locals") if name in block]
    assert len(found) == 1, f"local.{name}: {len(found)} definitions"
    return found[0]


def variable_default(tf: dict[str, dict], name: str):
    found = [v[name] for v in blocks(tf, "variable") if name in v]
    assert len(found) == 1, f"var.{name}: {len(found)} definitions"
    return found[0]["default"]


def one(block_list: list[dict]) -> dict:
    assert len(block_list) == 1, block_list
    return block_list[0]


def test_every_terraform_file_parses(tf):
    assert {"versions.tf", "cluster.tf", "node_pools.tf", "kuberay.tf", "storage.tf",
            "outputs.tf"} <= set(tf)


def test_the_node_pools_are_atelier_pools(tf):
    system = resource(tf, "google_container_node_pool", "system")
    gpu_pools = local(tf, "gpu_pools")
    assert {system["name"], *gpu_pools} == set(POOLS)
    assert set(gpu_pools) == set(GPU_POOLS)


def test_each_gpu_pool_gets_the_accelerator_its_nodes_are_selected_by(tf):
    gpu_pools = local(tf, "gpu_pools")
    node_config = one(resource(tf, "google_container_node_pool", "gpu")["node_config"])
    accelerator = one(node_config["guest_accelerator"])
    # GKE labels each node `cloud.google.com/gke-accelerator: <guest accelerator type>`.
    assert ACCELERATOR_LABEL == "cloud.google.com/gke-accelerator"
    assert accelerator["type"] == "${each.value.accelerator}"
    for name, pool in GPU_POOLS.items():
        assert gpu_pools[name]["accelerator"] == pool.accelerator, name
        assert pool.node_selector() == {ACCELERATOR_LABEL: gpu_pools[name]["accelerator"]}
        assert accelerator["count"] == pool.gpus, name
    assert node_config["labels"] == {"atelier.dev/pool": "${each.key}"}


def test_gpu_nodes_carry_the_taint_the_workers_tolerate(tf):
    node_config = one(resource(tf, "google_container_node_pool", "gpu")["node_config"])
    taint = one(node_config["taint"])
    assert taint["key"] == GPU_TOLERATION["key"]
    assert EFFECTS[taint["effect"]] == GPU_TOLERATION["effect"]
    # The toleration's operator Exists tolerates the taint whatever its value.
    assert GPU_TOLERATION["operator"] == "Exists"
    for pool in GPU_POOLS.values():
        assert pool.tolerations() == [GPU_TOLERATION]


def test_the_cpu_pool_has_no_gpu_and_no_taint(tf):
    system = resource(tf, "google_container_node_pool", "system")
    node_config = one(system["node_config"])
    assert "guest_accelerator" not in node_config and "taint" not in node_config
    cpu = POOLS[system["name"]]
    assert cpu.gpus == 0 and cpu.node_selector() == {} and cpu.tolerations() == []
    assert node_config["labels"] == {"atelier.dev/pool": "cpu"}


def test_gpu_pools_scale_from_zero_and_the_system_pool_keeps_a_node(tf):
    gpu = resource(tf, "google_container_node_pool", "gpu")
    assert one(gpu["autoscaling"])["total_min_node_count"] == 0
    system = one(resource(tf, "google_container_node_pool", "system")["autoscaling"])
    assert system["total_min_node_count"] == "${var.system_min_nodes}"
    assert variable_default(tf, "system_min_nodes") >= 1


def test_gke_installs_the_nvidia_driver(tf):
    node_config = one(resource(tf, "google_container_node_pool", "gpu")["node_config"])
    install = one(one(node_config["guest_accelerator"])["gpu_driver_installation_config"])
    assert install["gpu_driver_version"] == "${var.gpu_driver_version}"
    assert variable_default(tf, "gpu_driver_version") in ("DEFAULT", "LATEST")


def test_the_kuberay_operator_is_a_pinned_helm_release(tf):
    release = resource(tf, "helm_release", "kuberay_operator")
    assert release["chart"] == "kuberay-operator"
    assert release["repository"] == "https://ray-project.github.io/kuberay-helm/"
    assert release["version"] == "${var.kuberay_chart_version}"
    version = variable_default(tf, "kuberay_chart_version")
    assert re.fullmatch(r"1\.\d+\.\d+", version)
    # The chart's Ray token authOptions need 1.5.1 or later.
    assert tuple(map(int, version.split("."))) >= (1, 5, 1)


def test_the_hmac_key_belongs_to_a_service_account_bound_to_the_bucket_only(tf):
    binding = resource(tf, "google_storage_bucket_iam_member", "storage")
    assert binding["bucket"] == "${google_storage_bucket.atelier.name}"
    assert binding["member"] == "serviceAccount:${google_service_account.storage.email}"
    key = resource(tf, "google_storage_hmac_key", "storage")
    assert key["service_account_email"] == "${google_service_account.storage.email}"
    # No project-wide role for that account.
    for member in (r["google_project_iam_member"] for r in blocks(tf, "resource")
                   if "google_project_iam_member" in r):
        for binding in member.values():
            assert "google_service_account.storage" not in binding["member"]


def test_the_outputs_are_what_the_chart_values_need(tf):
    outputs = {name: body for block in blocks(tf, "output") for name, body in block.items()}
    assert {"bucket", "s3_endpoint", "s3_region", "s3_secret_name", "image_repository",
            "chart_values"} <= set(outputs)
    assert outputs["s3_endpoint"]["value"] == "https://storage.googleapis.com"
    # The Secret Terraform writes is the one the chart reads by default, with the keys it reads.
    secret = resource(tf, "kubernetes_secret_v1", "s3")
    values = yaml.safe_load((REPO / "charts" / "atelier" / "values.yaml").read_text())
    assert one(secret["metadata"])["name"] == values["storage"]["credentials"]["existingSecret"]
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_checkov_leaves_no_finding_unexplained():
    checkov = tool("checkov", CHECKOV_HINT)
    # --skip-download: offline (no guidelines or severities from the vendor's API), so every
    # failed check counts, whatever its severity.
    out = subprocess.run([checkov, "-d", str(INFRA), "--framework", "terraform", "--compact",
                          "--skip-download", "-o", "json"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f for r in reports for f in r["results"]["failed_checks"]]
    assert failed == [], "\n".join(f"{f['check_id']} {f['resource']}: {f['check_name']}"
                                   for f in failed)
    assert sum(r["summary"]["parsing_errors"] for r in reports) == 0
    # A skip is explained where it is written: `#checkov:skip=ID:reason`.
    for r in reports:
        for skipped in r["results"]["skipped_checks"]:
            reason = skipped["check_result"].get("suppress_comment", "")
            assert reason and reason != "No comment provided", \
                f"{skipped['check_id']} {skipped['resource']}: skipped without a reason"
