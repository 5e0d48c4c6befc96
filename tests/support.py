"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import random
from pathlib import Path

from atelier.registry import ConceptCard

REPO = Path(__file__).resolve().parents[1]


def write_credentials(path: Path, access: str, secret: str) -> Path:
    """An AWS shared-credentials file, the format the platform reads keys from."""
    path.write_text(f"[default]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n")
    return path


def bucket_settings(moto_server: str, folder: Path):
    """Settings for a fresh bucket on the moto server, with state and credentials under `folder`."""
    import uuid

    import boto3

    from atelier.settings import S3Settings, Settings

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3", endpoint_url=moto_server, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    creds = write_credentials(folder / "credentials", "testing", "testing")
    return Settings(
        home=folder / "home",
        s3=S3Settings(endpoint=moto_server, bucket=bucket, credentials_file=creds),
    )


def free_port() -> int:
    """A port free now, for a server (a toy, Ray Serve's proxy) to bind a moment later: outside
    the kernel's ephemeral range, where no outgoing connection can take it in between (a port-0
    pick lies inside it), and not in TIME_WAIT."""
    from atelier.stack import _process

    ephemeral = _process.ephemeral_ports()
    for _ in range(100):
        # Below the ports our own components take by themselves: Ray's defaults (6379, 8265,
        # workers 10002-19999), SeaweedFS's (8080, 8333, ...), the private stacks' (12000+).
        port = random.randrange(2000, 6000)
        if port not in ephemeral and _process.port_free("127.0.0.1", port, time_wait_counts=True):
            return port
    raise AssertionError("no free port found between 2000 and 6000")


def tool(name: str, hint: str) -> str:
    """An external tool's executable: on PATH, beside this interpreter (the dev extras' bin) or in
    the repository's .tools/<name>/bin (`make tools`). Without it the test skips, saying `hint`;
    under CI (where `make test` has fetched every tool) it fails instead, so that a missing tool
    can never pass for a passing check."""
    import os
    import shutil
    import sys

    import pytest

    found = next(filter(None, (shutil.which(name, path=path) for path in (
        None, str(Path(sys.executable).parent), str(REPO / ".tools" / name / "bin")))), None)
    if found:
        return found
    message = f"no {name}: {hint}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# Findings checkov makes on Atelier's manifests (the chart, the RayJobs of --kube) that stay, each
# with its reason. The tests fail on any other finding, and on an entry that no longer finds
# anything (so a fixed one is removed).
CHECKOV_EXPLAINED = {
    "CKV_K8S_8": "liveness probe: KubeRay injects Ray's own liveness probes into every Ray container "
                 "(none is set here, so they are not replaced)",
    "CKV_K8S_9": "readiness probe: likewise injected by KubeRay; on workers of a RayService it also "
                 "checks the Serve proxy",
    "CKV_K8S_15": "image pull policy Always: the tag is immutable (the chart pins <appVersion>-gpu) "
                  "and multi-GB CUDA images are not pulled again on every pod start",
    "CKV_K8S_22": "read-only root filesystem: Ray writes outside /tmp in some versions; open until "
                  "the image is shown to run with it (charts/atelier/DESIGN-NOTES.md)",
    "CKV_K8S_35": "S3 keys as environment variables: boto3 in Ray's workers reads them there; they "
                  "come from a Secret (secretRef), never a literal, and the API keys are a file",
    "CKV_K8S_40": "high UID: the Ray image's user is uid 1000, owner of its home; another uid "
                  "cannot write there",
    "CKV_K8S_43": "image digest: a tag is the default so that an upgrade reads as a version; pin a "
                  "digest with a tag of the form <tag>@sha256:...",
}


def with_ray_pods(docs: list[dict]) -> list[dict]:
    """The objects and, as Pods, the pod templates inside their RayServices and RayJobs: checkov
    does not look inside custom resources, and the Ray pods are where the containers' risks are."""
    out = list(docs)
    for doc in docs:
        cluster = {"RayService": lambda d: d["spec"]["rayClusterConfig"],
                   "RayJob": lambda d: d["spec"]["rayClusterSpec"]}.get(doc["kind"])
        if cluster is None:
            continue
        spec = cluster(doc)
        groups = [("head", spec["headGroupSpec"])]
        groups += [(group["groupName"], group) for group in spec["workerGroupSpecs"]]
        for name, group in groups:
            template = group["template"]
            out.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
                **template.get("metadata", {}), "name": f"{doc['metadata']['name']}-{name}",
                "namespace": doc["metadata"]["namespace"]}, "spec": template["spec"]})
    return out


def checkov_failures(docs: list[dict], folder: Path) -> tuple[set[tuple[str, str]], dict]:
    """checkov's failed checks (id, resource) on `docs` and their Ray pods, and its summary."""
    import json
    import subprocess

    import yaml

    checkov = tool("checkov", "run `make tools` (PyPI checkov in .tools/checkov)")
    manifests = folder / "manifests.yaml"
    manifests.write_text(yaml.safe_dump_all(with_ray_pods(docs)))
    # --skip-download: offline (no guidelines or severities from the vendor's API), so every
    # failed check counts, whatever its severity.
    out = subprocess.run([checkov, "-f", str(manifests), "--framework", "kubernetes", "--compact",
                          "--skip-download", "-o", "json"], capture_output=True, text=True,
                         timeout=300)
    report = json.loads(out.stdout)
    assert report["summary"]["parsing_errors"] == 0, report["summary"]
    failed = {(f["check_id"], f["resource"]) for f in report["results"]["failed_checks"]}
    return failed, report["summary"]


# -- registry cards and evaluations ----------------------------------------------------------

CONCEPT = ConceptCard(name="beaded-hoops", identifier="sks",
                      instance_prompt="photo of a pair of sks beaded hoops",
                      class_prompt="photo of a pair of hoops")


def card_fields(**override):
    """A model card's fields for Registry.publish, where only the registry is under test."""
    base = dict(method="full", base_model="tiny", concepts=[CONCEPT],
                hyperparameters={"learning_rate": 1e-6, "max_train_steps": 200},
                dataset_sha256="0" * 64, final_loss=0.125, run="s3://bucket/runs/r1")
    return {**base, **override}


def an_evaluation(ref: str, clip_i: float, *, base_clip_i: float = 0.5):
    """An evaluation of `ref` on one concept with CLIP-I `clip_i` (the base: `base_clip_i`)."""
    from atelier.quality.results import ConceptEvaluation, EvalConfig, Evaluation, MetricValue

    def values(v):
        return [MetricValue(metric="clip_i", value=v, encoder="shop-clip", images=8),
                MetricValue(metric="fid", value=12.5, encoder="shop-clip", images=8),
                MetricValue(metric="dino", unavailable="no DINO encoder configured")]

    return Evaluation(model=ref, base_model="shop", evaluated_at="2026-11-30T00:00:00Z",
                      config=EvalConfig(), concepts=[ConceptEvaluation(
                          concept="beaded-hoops", prompts={"instance": ["p"]}, metrics=values(clip_i),
                          base_metrics=values(base_clip_i), grid="grids/beaded-hoops.png")])
