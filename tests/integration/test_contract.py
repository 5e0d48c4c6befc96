"""The HTTP contract: schemathesis fuzzes the live endpoint (`atelier serve up` on the embedded
stack) from its own OpenAPI document with every check on. Any finding fails: an undeclared status,
a response unlike its schema, a schema-violating body accepted, a valid one refused, a 5xx."""

from __future__ import annotations

import json

import pytest
import requests
import schemathesis
from test_serve import CONFIG, KEY

from atelier.endpoint.config import ServeConfig
from atelier_serve.openapi import openapi_json
from support import free_port

pytestmark = pytest.mark.integration

# The served limits bound what the fuzzer may ask for: a valid request is at most 2 images of
# 64 px in 2 steps, so each costs the tiny model well under a second on 2 cores.
LIMITS = {"max_images": 2, "max_steps": 2, "min_side": 32, "max_width": 64, "max_height": 64,
          "max_prompt_chars": 200, "max_guidance_scale": 15}
# Fuzzing cases per operation (the coverage phase adds its own boundary cases); a fixed seed so
# that a failure reproduces.
MAX_EXAMPLES = 100
SEED = 20261129


def contract_config(**more) -> dict:
    return {**CONFIG, "limits": LIMITS, "defaults": {"steps": 1}, "default_model": "tiny", **more}


@pytest.fixture(scope="module")
def contract_served(serve, tiny_model, tmp_path_factory):
    """The application deployed with `atelier serve up --config` and the tight limits above;
    the base model "tiny" is the default of a request that names none."""
    tmp = tmp_path_factory.mktemp("contract")
    keys = tmp / "api-keys"
    keys.write_text(f"{KEY}\n")
    port = free_port()
    config = contract_config(auth={"api_keys_file": str(keys)}, http={**CONFIG["http"], "port": port})
    with serve(config):
        yield f"http://127.0.0.1:{port}"


# The document `build_api` makes for the served config, loaded when the tests are collected (the
# pytest integration parametrizes then); `test_the_served_document_is_the_one_fuzzed` checks that
# the live /openapi.json is this one. (schemathesis.pytest.from_fixture, which would load the
# live one, fails on pytest 9: it sets Function._nodeid, which pytest 9 no longer has.)
DOCUMENT = json.loads(openapi_json(ServeConfig.parse(contract_config())))
schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_dict({
    "seed": SEED,
    "headers": {"Authorization": f"Bearer {KEY}"},
    "request-timeout": 60,
    # Every check is on by default but this one, which needs a limit: a generous one, as the
    # bar here is "answers as documented", not speed.
    "checks": {"max_response_time": 30},
    "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
}))


@schema.parametrize()
@pytest.mark.timeout(300)
def test_the_endpoint_keeps_its_openapi_contract(case, contract_served):
    case.call_and_validate(base_url=contract_served)


def test_the_served_document_is_the_one_fuzzed(contract_served):
    assert requests.get(f"{contract_served}/openapi.json", timeout=30).json() == DOCUMENT


def test_every_ref_of_the_document_resolves(contract_served):
    """A $ref that does not resolve hides part of the contract from every client (and from
    the fuzzer, which skips it with a warning rather than a failure)."""
    document = requests.get(f"{contract_served}/openapi.json", timeout=30).json()

    def refs(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    def resolves(ref: str) -> bool:
        node = document
        for part in ref.removeprefix("#/").split("/"):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return ref.startswith("#/")

    found = sorted(set(refs(document)))
    assert found and [ref for ref in found if not resolves(ref)] == []


def test_a_body_that_is_not_utf8_is_a_declared_422(contract_served):
    response = requests.post(f"{contract_served}/v1/images/generations", data=b'{"prompt": "\xff"}',
                             headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                             timeout=30)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"] == "InvalidInput"
