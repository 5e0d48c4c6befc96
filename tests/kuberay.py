"""KubeRay custom resources checked as the Kubernetes API server would check them, offline: the
CRD's openAPIV3Schema (types, enums, bounds, required), unknown fields where the schema does not
preserve them (what `fieldValidation=Strict` refuses) and the CEL rules of
`x-kubernetes-validations`, evaluated with cel-python. Transition rules (those that read
`oldSelf`) run only on an update, given the old object, as the API server runs them.

Not checked, because the API server does them outside the schema: defaulting, list-map key
uniqueness (`x-kubernetes-list-map-keys`), `metadata.name` format, and quota/admission webhooks.

The CRDs come from ATELIER_KUBERAY_CRDS, else ../shared/kuberay-crds beside the repository.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS = Path(os.environ.get("ATELIER_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))
FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml",
         "RayCluster": "ray.io_rayclusters.yaml"}
MISSING = f"no KubeRay CRDs at {CRDS} (../shared/kuberay-crds; or set ATELIER_KUBERAY_CRDS)"


def available() -> bool:
    return all((CRDS / name).is_file() for name in FILES.values())


@cache
def schema(kind: str, version: str = "v1") -> dict[str, Any]:
    """The openAPIV3Schema of `kind` (the files are MBs of YAML: read once)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / FILES[kind]).read_text(), Loader=loader)
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return found["schema"]["openAPIV3Schema"]


@cache
def _validator(kind: str, version: str):
    import jsonschema

    return jsonschema.Draft202012Validator(schema(kind, version))


@cache
def _program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def problems(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Every reason the API server would refuse `obj` (a create, or an update of `old`), each
    as `path: message`; [] when it would accept it."""
    kind, version = obj.get("kind"), str(obj.get("apiVersion", "")).rpartition("/")[2]
    if kind not in FILES or not str(obj.get("apiVersion", "")).startswith("ray.io/"):
        return [f"/: not a KubeRay custom resource (apiVersion {obj.get('apiVersion')}, "
                f"kind {kind})"]
    found = [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}"
             for e in _validator(kind, version).iter_errors(obj)]
    _walk(obj, old, schema(kind, version), "", found)
    return found


def unknown_fields(found: list[str]) -> list[str]:
    """The problems that are unknown fields (a Strict request's 400; the rest are 422)."""
    return [p for p in found if p.endswith(": unknown field")]


def _walk(obj: Any, old: Any, sch: dict[str, Any], path: str, found: list[str]) -> None:
    """Unknown fields and CEL rules, depth first. jsonschema ignores `x-kubernetes-*` keys, and a
    structural schema never says `additionalProperties: false`, so both are walked here."""
    for rule in sch.get("x-kubernetes-validations", []):
        _check_rule(rule, obj, old, path, found)
    if sch.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(obj, dict) and "properties" in sch:
        for key, value in obj.items():
            if key in sch["properties"]:
                older = old.get(key) if isinstance(old, dict) else None
                _walk(value, older, sch["properties"][key], f"{path}/{key}", found)
            elif not isinstance(sch.get("additionalProperties"), dict):
                found.append(f"{path}/{key}: unknown field")
    elif isinstance(obj, dict) and isinstance(sch.get("additionalProperties"), dict):
        for key, value in obj.items():
            older = old.get(key) if isinstance(old, dict) else None
            _walk(value, older, sch["additionalProperties"], f"{path}/{key}", found)
    elif isinstance(obj, list) and "items" in sch:
        for i, item in enumerate(obj):
            # Items of an atomic list have no identity across updates: no old item.
            _walk(item, None, sch["items"], f"{path}/{i}", found)


def _check_rule(rule: dict[str, Any], value: Any, old: Any, path: str, found: list[str]) -> None:
    import celpy

    text = rule["rule"]
    activation = {"self": celpy.json_to_cel(value)}
    if "oldSelf" in text:
        if old is None:  # a transition rule: nothing to compare on a create
            return
        activation["oldSelf"] = celpy.json_to_cel(old)
    try:
        result = _program(text).evaluate(activation)
    except celpy.CELEvalError as e:
        found.append(f"{path or '/'}: rule {text!r} could not be evaluated: {e}")
        return
    if not bool(result):
        found.append(f"{path or '/'}: {rule.get('message') or f'failed rule: {text}'}")
