"""The Helm chart's (charts/atelier) share of the one source: its values.yaml blocks written from
the pools table and the ServeConfig model, and the serveConfigV2 the chart must render for a set of
values, made by the CLI's own function so that the two cannot disagree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from atelier import pools
from atelier.endpoint.config import Auth, ServeConfig
from atelier.endpoint.rayservice import check_fits, serve_config_v2
from atelier.environment import POD_HOME, pod_env
from atelier.settings import S3Settings, Settings

CHART = Path("charts") / "atelier"
VALUES = CHART / "values.yaml"
# The chart mounts the API keys Secret here (a file, so that keys rotate without a restart).
API_KEYS_FILE = Path("/etc/atelier/api-keys")
# The pool a fresh install serves on.
DEFAULT_POOLS = ("t4",)
# The chart sets these per application (one application per enabled pool).
PER_POOL = ("gpu",)


def serve_defaults() -> ServeConfig:
    """The chart's ServeConfig: no built-in test model, API keys from the mounted Secret."""
    return ServeConfig(base_models={},
                       auth=Auth(api_keys_file=API_KEYS_FILE, api_keys_env=None))


def application(serve: dict[str, Any], pool: str) -> dict[str, Any]:
    """The ServeConfig of the application on `pool`: the values' `serve` with the pool set, and
    a name and a route of its own (`<name>-<pool>` under `<route_prefix>/<pool>`)."""
    prefix = serve.get("route_prefix", "/").rstrip("/")
    return {**serve, "gpu": pool, "name": f"{serve.get('name', 'atelier')}-{pool}",
            "route_prefix": f"{prefix}/{pool}"}


def serve_config(values: dict[str, Any]) -> dict[str, Any]:
    """The serveConfigV2 the chart renders for `values` (the chart's values merged with the
    user's), as `atelier serve config` makes it: one application per enabled pool."""
    storage = values["storage"]
    settings = Settings(home=Path(POD_HOME), s3=S3Settings(
        endpoint=storage.get("endpoint") or None, region=storage["region"],
        bucket=storage["bucket"]))
    env = pod_env(settings)
    document: dict[str, Any] = {}
    applications = []
    # In the order of their names, as a Helm template ranges over a map.
    for name, pool in sorted(values["pools"].items()):
        if not pool.get("enabled"):
            continue
        config = ServeConfig.parse(application(values["serve"], name), where=f"pools.{name}")
        check_fits(config)
        document = serve_config_v2(config, env=env, host="0.0.0.0")
        applications += document["applications"]
    return {**document, "applications": applications}


# -- the generated blocks of values.yaml ---------------------------------------------------------
def pool_values() -> dict[str, dict[str, Any]]:
    """`pools:` of values.yaml: each pool's worker group, its pod fields from the table."""
    serving = serve_defaults().pools
    out = {}
    for name, node in pools.POOLS.items():
        scaling = getattr(serving, name).autoscaling
        # One model replica per worker pod: the group scales between the replicas' bounds.
        out[name] = {"enabled": name in DEFAULT_POOLS, "minReplicas": scaling.min_replicas,
                     "maxReplicas": scaling.max_replicas, "nodeSelector": node.node_selector(),
                     "tolerations": node.tolerations(), "resources": node.resources()}
    return out


def pool_docs() -> dict[str, str]:
    docs: dict[str, str] = {}
    for name, node in pools.POOLS.items():
        docs |= {
            f"pools.{name}.enabled": f"Run a worker group and a Serve application on these "
            f"nodes: {node.description}",
            f"pools.{name}.minReplicas": "Fewest worker pods (0 lets the group scale to zero).",
            f"pools.{name}.maxReplicas": "Most worker pods the Ray autoscaler may start.",
            f"pools.{name}.nodeSelector": "Node labels that pick these nodes.",
            f"pools.{name}.tolerations": "Taints of these nodes the worker pods tolerate.",
            f"pools.{name}.resources": "The worker container's requests and limits.",
        }
    return docs


def _model_docs(model: type[BaseModel], prefix: str) -> dict[str, str]:
    docs: dict[str, str] = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}"
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            docs |= _model_docs(kind, path)
        else:
            docs[path] = field.description or ""
    return docs


def serve_values() -> dict[str, Any]:
    """`serve:` of values.yaml: the chart's ServeConfig, less what the chart sets per pool."""
    dump = serve_defaults().model_dump(mode="json")
    return {key: value for key, value in dump.items() if key not in PER_POOL}


def _emit(data: dict[str, Any], path: str, docs: dict[str, str], indent: int) -> list[str]:
    """YAML of `data` with a bitnami readme-generator `## @param` line above each value."""
    lines = []
    pad = " " * indent
    for key, value in data.items():
        here = f"{path}.{key}"
        if here not in docs and isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines += _emit(value, here, docs, indent + 2)
            continue
        modifier = ("[object] " if isinstance(value, dict) else "[array] "
                    if isinstance(value, list) else "[nullable] " if value is None else "")
        lines.append(f"{pad}## @param {here} {modifier}{docs[here]}".rstrip())
        text = yaml.safe_dump({key: value}, sort_keys=False, width=1000, default_flow_style=False)
        lines += [pad + line for line in text.splitlines()]
    return lines


def blocks() -> dict[str, str]:
    """Block name -> its generated YAML (top-level key included)."""
    serve_docs = _model_docs(ServeConfig, "serve")
    return {
        "pools": "\n".join(["pools:", *_emit(pool_values(), "pools", pool_docs(), 2)]),
        "serve": "\n".join(["serve:", *_emit(serve_values(), "serve", serve_docs, 2)]),
    }


BEGIN = "# >>> {name}: generated by `make generate` from {source}; do not edit between the marks"
END = "# <<< {name}"
SOURCES = {"pools": "atelier.pools", "serve": "atelier.endpoint.config.ServeConfig"}


def values_yaml(current: str) -> str:
    """values.yaml with its generated blocks rewritten (the rest is written by hand)."""
    for name, body in blocks().items():
        begin, end = BEGIN.format(name=name, source=SOURCES[name]), END.format(name=name)
        pattern = re.compile(rf"^{re.escape(begin)}\n.*?^{re.escape(end)}$", re.S | re.M)
        found = pattern.search(current)
        if not found:
            raise ValueError(f"{VALUES}: the marks of the generated {name} block are missing")
        current = f"{current[:found.start()]}{begin}\n{body}\n{end}{current[found.end():]}"
    return current
