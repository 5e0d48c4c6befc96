"""The Grafana dashboard of a serving installation, as code (Grafana's grafana-foundation-sdk): `make
generate` writes it into the chart, whose ConfigMap hands it to Grafana's dashboard sidecar."""

from __future__ import annotations

import warnings

from atelier.kube.chart import CHART

with warnings.catch_warnings():
    # Importing the SDK warns that its v2 dashboard (Grafana 12's resource API, behind a feature
    # flag there) is preferred; the sidecar provisions files of the classic JSON model, made here.
    warnings.simplefilter("ignore", DeprecationWarning)
    from grafana_foundation_sdk.builders.common import VizLegendOptions, VizTooltipOptions
    from grafana_foundation_sdk.builders.dashboard import (
        Dashboard,
        DatasourceVariable,
        QueryVariable,
        Row,
    )
    from grafana_foundation_sdk.builders.prometheus import Dataquery
    from grafana_foundation_sdk.builders.timeseries import Panel
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.common import (
        DataSourceRef,
        LegendDisplayMode,
        LegendPlacement,
        SortOrder,
        TooltipDisplayMode,
    )
    from grafana_foundation_sdk.models.dashboard import VariableRefresh, VariableSort

PATH = CHART / "dashboards" / "atelier.json"
# Stable across releases, so that links and bookmarks to the dashboard survive an upgrade.
UID = "atelier-serving"
TITLE = "Atelier / Serving"

# Ray's own metrics the panels read, as Prometheus names them (`ray_` prefix, `_total` on
# counters), with where Ray 2.60 defines each and its tags.
RAY_METRICS = {
    "ray_serve_num_http_requests_total":
        "ray/serve/_private/request_ingress_metrics.py: Counter serve_num_http_requests "
        "(route, method, application, status_code), counted by each proxy",
    "ray_serve_deployment_replica_healthy":
        "ray/serve/_private/deployment_state.py: Gauge serve_deployment_replica_healthy "
        "(deployment, application), the healthy replica count",
    "ray_serve_deployment_queued_queries":
        "ray/serve/_private/router.py: Gauge serve_deployment_queued_queries "
        "(deployment, application, handle, actor_id), requests waiting for a replica",
    "ray_serve_num_ongoing_http_requests":
        "ray/serve/_private/request_ingress_metrics.py: Gauge serve_num_ongoing_http_requests "
        "(node_id, node_ip_address), requests in flight at each proxy",
    "ray_node_gpus_utilization":
        "ray/dashboard/modules/reporter/reporter_agent.py: Gauge node_gpus_utilization, percent "
        "(ip, RayNodeType, IsHeadNode, GpuIndex, GpuDeviceName)",
}
# The PodMonitor copies each Ray pod's `atelier.dev/gpu` label into this target label, so that
# node metrics (GPU utilisation) can be told apart by pool. Not `gpu`: Atelier's own metrics carry
# a `gpu` tag already, which a target label of the same name would rename to `exported_gpu`.
POOL_LABEL = "pool"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Atelier's metrics of the selected models and GPU types.
MODEL_GPU = 'model=~"$model", gpu=~"$gpu"'
# Serve's metrics of the applications of the selected GPU types: one application per pool, named
# `<serve.name>-<pool>` (atelier.kube.chart.application).
APPLICATIONS = 'application=~".+-$gpu"'


def _query(expr: str, legend: str) -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE).range()


def _panel(title: str, description: str, unit: str, *queries: Dataquery, width: int = 12) -> Panel:
    panel = (Panel().title(title).description(description).unit(unit).min(0)
             .datasource(DATASOURCE).height(8).span(width)
             .legend(VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST)
                     .placement(LegendPlacement.BOTTOM))
             .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI)
                      .sort(SortOrder.DESCENDING)))
    for query in queries:
        panel = panel.with_target(query)
    return panel


def _latency(quantile: float) -> Panel:
    percentile = f"p{round(quantile * 100)}"
    return _panel(
        f"Generation latency {percentile} by model and GPU type",
        f"{percentile} of the time from a request reaching a model replica to its images "
        "(waiting for a batch included).",
        "s",
        _query(f"histogram_quantile({quantile}, sum by (model, gpu, le) "
               f"(rate(ray_atelier_generation_latency_s_bucket{{{MODEL_GPU}}}[$__rate_interval])))",
               "{{model}} on {{gpu}}"),
    )


def _variable(name: str, label: str, query: str) -> QueryVariable:
    """A multi-value filter; All is `.*`, so that a model or pool that appears later is shown."""
    return (QueryVariable(name).label(label).datasource(DATASOURCE).query(query)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*"))


def rows() -> dict[str, list[Panel]]:
    """Row title -> its panels."""
    return {
        "Traffic": [
            _panel("HTTP requests per second by application and status",
                   "Requests the Serve proxies answered, per application (one per GPU pool).",
                   "reqps",
                   # Routes under /-/ are Serve's health checks.
                   _query("sum by (application, status_code) (rate(ray_serve_num_http_requests_total"
                          f'{{{APPLICATIONS}, route!~"/-/.*"}}[$__rate_interval]))',
                          "{{application}} {{status_code}}")),
            _panel("Generations per second by model and GPU type",
                   "Generation requests the model replicas finished, and those that failed.",
                   "reqps",
                   _query("sum by (model, gpu) (rate(ray_atelier_generation_latency_s_count"
                          f"{{{MODEL_GPU}}}[$__rate_interval]))", "{{model}} on {{gpu}}"),
                   _query("sum by (model, gpu) (rate(ray_atelier_generation_failures_total"
                          f"{{{MODEL_GPU}}}[$__rate_interval]))", "failed: {{model}} on {{gpu}}")),
        ],
        "Latency": [_latency(0.5), _latency(0.95)],
        "Throughput": [
            _panel("Images per second by GPU type", "Images the model replicas generated.",
                   "short",
                   _query("sum by (gpu) (rate(ray_atelier_images_generated_total"
                          f"{{{MODEL_GPU}}}[$__rate_interval]))", "{{gpu}}")),
            _panel("Images per pipeline call by GPU type",
                   "Mean batch size: images generated over pipeline calls. Near "
                   "max_batch_images under load, batching works; near 1, requests are spread "
                   "too thin.",
                   "short",
                   # Ray exports a histogram's _sum from bucket midpoints: the images counter is
                   # exact. The batch histogram has no model tag (one call may mix models).
                   _query('sum by (gpu) (rate(ray_atelier_images_generated_total{gpu=~"$gpu"}'
                          "[$__rate_interval])) / sum by (gpu) (rate("
                          'ray_atelier_batch_images_count{gpu=~"$gpu"}[$__rate_interval]))',
                          "{{gpu}}")),
        ],
        "Capacity": [
            _panel("Replicas by application and deployment",
                   "Healthy replicas of each deployment, as Serve's controller counts them.",
                   "short",
                   _query("sum by (application, deployment) (ray_serve_deployment_replica_healthy"
                          f"{{{APPLICATIONS}}})", "{{application}} {{deployment}}"),
                   width=8),
            _panel("Queue length",
                   "Requests waiting for a replica of each deployment, and requests in flight at "
                   "the proxies (all applications).",
                   "short",
                   _query("sum by (application, deployment) (ray_serve_deployment_queued_queries"
                          f"{{{APPLICATIONS}}})", "queued: {{application}} {{deployment}}"),
                   _query("sum(ray_serve_num_ongoing_http_requests)", "in flight at the proxies"),
                   width=8),
            _panel("GPU utilisation by pool",
                   f"Each GPU of the Ray nodes, by pool (the `{POOL_LABEL}` label that the chart's "
                   "PodMonitor copies from the pod label atelier.dev/gpu).",
                   "percent",
                   _query(f"max by ({POOL_LABEL}, pod, GpuIndex, GpuDeviceName) "
                          f'(ray_node_gpus_utilization{{{POOL_LABEL}=~"$gpu"}})',
                          f"{{{{{POOL_LABEL}}}}} {{{{pod}}}} GPU {{{{GpuIndex}}}}"),
                   width=8),
        ],
    }


def build() -> Dashboard:
    """The dashboard: traffic, latency, throughput, capacity, filtered by GPU type and model."""
    dashboard = (
        Dashboard(TITLE).uid(UID).tags(["atelier", "ray-serve"])
        .description("Atelier's Serve applications (one per GPU pool): requests, latency by model "
                     "and GPU type, images per second, replicas, queues and GPU use.")
        .time("now-1h", "now").refresh("30s").timezone("browser")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(_variable("gpu", "GPU type",
                                 "label_values(ray_atelier_images_generated_total, gpu)"))
        .with_variable(_variable("model", "Model", "label_values("
                                 'ray_atelier_images_generated_total{gpu=~"$gpu"}, model)'))
    )
    ids = iter(range(1, 1000))  # Grafana wants a unique id per panel, rows included
    for title, panels in rows().items():
        dashboard = dashboard.with_row(Row(title).id(next(ids)))
        for panel in panels:
            dashboard = dashboard.with_panel(panel.id(next(ids)))
    return dashboard


def json_text() -> str:
    """The dashboard's JSON as the chart ships it (charts/atelier/dashboards/atelier.json)."""
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"
