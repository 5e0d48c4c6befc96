"""Finish the chart's values.schema.json from what `readme-generator` wrote (`make generate` runs
it right after the generator). The generator reads the `## @param` lines of values.yaml but, left
alone, its schema accepts unknown keys, calls every number `number`, leaves `[object]` values out
(so refusing unknown keys would refuse them), types every array's items as strings and gives a
nullable value the type `object`. This step, the same on every run, makes the schema say what the
chart takes:

- every object made of documented keys refuses other keys (`additionalProperties: false`), from
  the top level down; `[object]` values (labels, resources, security contexts) stay free-form;
- a value whose default is a whole number is an `integer`; counts of replicas, pods and seconds
  may not be negative (`MINIMUM`);
- an array's items take the type of its default's items (none when the default is empty);
- a `[nullable]` value whose default is null takes any type;
- every `default` is the value in values.yaml (the generator writes arrays' as the string "[]").

Usage: chart_schema.py RAW VALUES OUT
"""

from __future__ import annotations

import json
import sys
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

# Values that may not go below 0; fnmatch patterns over dotted paths.
MINIMUM = {
    "pools.*.minReplicas": 0,
    "pools.*.maxReplicas": 0,
    "serve.pools.*.autoscaling.min_replicas": 0,
    "serve.pools.*.autoscaling.initial_replicas": 0,
    "serve.pools.*.autoscaling.max_replicas": 0,
    "serve.ingress.replicas": 0,
    "podDisruptionBudget.minAvailable": 0,
    "ray.autoscaler.idleTimeoutSeconds": 0,
}
JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", dict: "object",
              list: "array"}


def params(values_text: str) -> dict[str, set[str]]:
    """Dotted path -> modifiers (`object`, `array`, `nullable`, ...) of every `## @param` line."""
    out: dict[str, set[str]] = {}
    for line in values_text.splitlines():
        words = line.strip().split(maxsplit=3)
        if words[:2] != ["##", "@param"] or len(words) < 3:
            continue
        modifiers = words[3] if len(words) > 3 else ""
        out[words[2]] = ({m.strip() for m in modifiers[1:modifiers.index("]")].split(",")}
                         if modifiers.startswith("[") else set())
    return out


def _lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for key in path.split("."):
        node = node[key]
    return node


def _node(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """The schema of `path`, made (as an object with properties) where the generator left it out."""
    node = schema
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault("properties", {}).setdefault(key, {"type": "object"})
    return node.setdefault("properties", {}).setdefault(keys[-1], {})


def _close(node: dict[str, Any]) -> None:
    if node.get("type") == "object" and "properties" in node:
        node["additionalProperties"] = False
        for child in node["properties"].values():
            _close(child)


def finish(raw: dict[str, Any], values_text: str) -> dict[str, Any]:
    schema = json.loads(json.dumps(raw))
    values = yaml.safe_load(values_text)
    for path, modifiers in params(values_text).items():
        node = _node(schema, path)
        default = _lookup(values, path)
        node["default"] = default
        if "object" in modifiers:
            node["type"] = "object"
        elif "array" in modifiers:
            node["type"] = "array"
            kinds = {JSON_TYPES[type(item)] for item in default}
            node.pop("items", None)
            if len(kinds) == 1:
                node["items"] = {"type": kinds.pop()}
        elif default is None:
            node.pop("type", None)
        elif type(default) is int:
            node["type"] = "integer"
        node.pop("nullable", None)
        minimum = [low for pattern, low in MINIMUM.items() if fnmatchcase(path, pattern)]
        if minimum:
            node["minimum"] = minimum[0]
    _close(schema)
    return schema


def main(raw: str, values: str, out: str) -> int:
    schema = finish(json.loads(Path(raw).read_text()), Path(values).read_text())
    Path(out).write_text(json.dumps(schema, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
