"""The Grafana dashboard as code (atelier.kube.dashboard) and the chart's monitoring objects: the
generated JSON is current, every query reads a metric that exists, and the chart ships the
dashboard to Grafana's sidecar and a PodMonitor for the Ray pods, both only when asked."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from atelier.kube import dashboard
from support import REPO
from test_chart import _run, helm, one, ray_pods, render

METRICS_PY = REPO / "serve" / "atelier_serve" / "metrics.py"
# The series Prometheus stores for each kind of Ray metric.
SERIES = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_count", "_sum"]}
MONITORING_ON = {"monitoring": {"podMonitor": {"enabled": True, "interval": "30s",
                                               "labels": {"release": "kube-prometheus-stack"}},
                                "dashboard": {"enabled": True}}}


def document() -> dict[str, Any]:
    return json.loads((REPO / dashboard.PATH).read_text())


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel's queries."""
    return [(panel["title"], target["expr"]) for panel in document()["panels"]
            for target in panel.get("targets", [])]


def atelier_series() -> set[str]:
    """The series Atelier's own metrics export, read from the source of ModelMetrics (a metric
    object needs a Serve replica to be made): `metrics.<Kind>("<name>", ...)`, with Ray's prefix."""
    series = set()
    for node in ast.walk(ast.parse(METRICS_PY.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in SERIES and node.args
                and isinstance(node.args[0], ast.Constant)):
            series |= {f"ray_{node.args[0].value}{suffix}" for suffix in SERIES[node.func.attr]}
    return series


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: label matchers, ranges and grouping removed,
    an identifier not followed by `(` (a function or aggregation) is a metric."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)", " ", expr)
    return set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", bare))


def ray_defines(name: str, source: str) -> bool:
    """Whether the Ray file `source` (relative to the installed ray package's parent) defines
    the metric `name` as Prometheus sees it: literally, or through an f-string of a family."""
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations, "ray is not installed"
    text = (Path(spec.submodule_search_locations[0]).parent / source).read_text()
    base = name.removeprefix("ray_").removesuffix("_total")
    for literal in re.findall(r'f?"([a-z_{}]+)"', text):
        pattern = re.sub(r"\\\{[a-z_]+\\\}", "[a-z]+", re.escape(literal))
        if re.fullmatch(pattern, base):
            return True
    return False


# -- the generated file ----------------------------------------------------------------------------
def test_the_chart_s_dashboard_should_be_what_its_generator_writes():
    assert (REPO / dashboard.PATH).read_text() == dashboard.json_text(), \
        f"{dashboard.PATH} drifted: run `make generate`"


def test_make_generate_should_write_the_dashboard():
    spec = importlib.util.spec_from_file_location("generate", REPO / "scripts" / "generate.py")
    assert spec and spec.loader
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.outputs()[dashboard.PATH] == dashboard.json_text()


def test_the_dashboard_should_keep_its_uid_across_releases():
    assert document()["uid"] == "atelier-serving"


# -- what the panels read --------------------------------------------------------------------------
def test_every_query_should_read_a_metric_that_atelier_or_ray_exports():
    known = atelier_series() | set(dashboard.RAY_METRICS)
    variables = [variable["query"] for variable in document()["templating"]["list"]
                 if variable["type"] == "query"]
    for where, expr in [*queries(), *(("variables", query) for query in variables)]:
        names = metric_names(re.sub(r"label_values\(([^,{]+).*", r"\1", expr))
        assert names, f"{where}: no metric in {expr}"
        assert names <= known, f"{where}: {sorted(names - known)} exported by nothing"


def test_atelier_s_metrics_should_be_read_from_its_source():
    """The parser of metrics.py finds the metrics the dashboard leans on (else the test above
    would pass on an empty set)."""
    assert {"ray_atelier_generation_latency_s_bucket", "ray_atelier_images_generated_total",
            "ray_atelier_batch_images_count"} <= atelier_series()


@pytest.mark.parametrize("name", sorted(dashboard.RAY_METRICS))
def test_each_ray_metric_should_be_defined_where_its_source_says(name):
    source = dashboard.RAY_METRICS[name].split(":")[0]
    assert ray_defines(name, source), f"{name} is not defined in the installed {source}"


def test_latency_p50_and_p95_should_be_by_model_and_gpu_type():
    latency = {}
    for title, expr in queries():
        found = re.match(r"histogram_quantile\(([0-9.]+),.*\bby \(([^)]*)\).*"
                         r"ray_atelier_generation_latency_s_bucket", expr)
        if found:
            latency[found[1]] = ({label.strip() for label in found[2].split(",")}, title)
    assert set(latency) == {"0.5", "0.95"}
    for quantile, (labels, title) in latency.items():
        assert labels == {"model", "gpu", "le"}, f"p{quantile}: grouped by {labels}"
        assert "model" in title and "GPU" in title


def test_the_panels_should_cover_the_issue_s_list():
    reads = {name for _, expr in queries() for name in metric_names(expr)}
    assert {"ray_serve_num_http_requests_total", "ray_atelier_images_generated_total",
            "ray_serve_deployment_replica_healthy", "ray_serve_deployment_queued_queries",
            "ray_node_gpus_utilization", "ray_atelier_batch_images_count"} <= reads


def test_every_panel_should_read_the_chosen_data_source_and_filter_by_gpu_type():
    variables = {v["name"]: v for v in document()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"gpu", "model"} <= set(variables)
    for panel in document()["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert any("$gpu" in target["expr"] for target in panel["targets"]), panel["title"]


def test_every_panel_should_have_an_id_of_its_own():
    ids = [panel["id"] for panel in document()["panels"]]
    assert len(ids) == len(set(ids))


# -- the chart -------------------------------------------------------------------------------------
@helm
def test_should_make_no_dashboard_or_pod_monitor_unless_enabled(major):
    docs = render(major, {})
    assert not [doc for doc in docs if doc["kind"] == "PodMonitor"]
    assert not [doc for doc in docs if doc["metadata"]["name"].endswith("-dashboard")]


@helm
def test_should_lint_strictly_with_monitoring_enabled(major):
    lint = _run(major, "lint", json.dumps(MONITORING_ON, sort_keys=True))
    assert lint.returncode == 0, lint.stdout + lint.stderr


@helm
def test_should_give_grafana_s_sidecar_the_dashboard_file_in_a_labelled_config_map(major):
    config_map = next(doc for doc in render(major, MONITORING_ON)
                      if doc["metadata"]["name"] == "release-atelier-dashboard")
    assert config_map["apiVersion"] == "v1" and config_map["kind"] == "ConfigMap"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "ml"
    assert config_map["data"] == {"atelier.json": (REPO / dashboard.PATH).read_text()}


@helm
def test_should_label_the_dashboard_as_the_sidecar_is_configured(major):
    over = {"monitoring": {"dashboard": {"enabled": True, "label": "team_dashboards",
                                         "labelValue": "atelier", "namespace": "monitoring",
                                         "annotations": {"grafana_folder": "Atelier"}}}}
    config_map = next(doc for doc in render(major, over)
                      if doc["metadata"]["name"] == "release-atelier-dashboard")
    assert config_map["metadata"]["labels"]["team_dashboards"] == "atelier"
    assert "grafana_dashboard" not in config_map["metadata"]["labels"]
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Atelier"}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    matched = all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        matched = matched and labels.get(expression["key"]) in expression["values"]
    return matched


@helm
def test_should_scrape_the_metrics_port_of_every_ray_pod_of_the_release(major):
    docs = render(major, {**MONITORING_ON, "pools": {"t4": {"enabled": True},
                                                      "a100": {"enabled": True}}})
    monitor = one(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e["path"], e["interval"]) for e in endpoints] == \
        [("metrics", "/metrics", "30s")]
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"],
                 *(group["template"] for group in cluster["workerGroupSpecs"])]
    assert len(templates) == 3
    for template in templates:
        assert _selects(monitor["spec"]["selector"], template["metadata"]["labels"])
        ray = template["spec"]["containers"][0]
        assert "metrics" in {port["name"] for port in ray["ports"]}, ray["name"]
    other_release = {**templates[1]["metadata"]["labels"], "app.kubernetes.io/instance": "other"}
    assert not _selects(monitor["spec"]["selector"], other_release)


@helm
def test_should_label_each_scraped_series_with_the_pool_of_its_pod(major):
    docs = render(major, {**MONITORING_ON, "pools": {"t4": {"enabled": True},
                                                      "a100": {"enabled": True}}})
    workers = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert {g["groupName"]: g["template"]["metadata"]["labels"]["atelier.dev/gpu"]
            for g in workers} == {"t4": "t4", "a100": "a100"}
    # Prometheus's name of a pod label: every character outside [a-zA-Z0-9_] becomes `_`.
    source = "__meta_kubernetes_pod_label_" + re.sub(r"\W", "_", "atelier.dev/gpu")
    relabelings = one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {"sourceLabels": [source], "targetLabel": dashboard.POOL_LABEL} in relabelings


@helm
def test_the_metrics_port_should_clash_with_no_other_port_of_a_ray_container(major):
    for pod in ray_pods(major, MONITORING_ON):
        ports = pod["containers"][0]["ports"]
        assert len({p["containerPort"] for p in ports}) == len({p["name"] for p in ports}) \
            == len(ports)
