"""The serving config: what it accepts and refuses, the request model it bounds, the serveConfigV2
it writes (valid for Serve, deterministic, equal to the committed example), and API keys."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from atelier.endpoint import GenerationRequest, ServeConfig, request_model, serve_config_v2
from atelier.endpoint.config import Auth
from atelier.endpoint.rayservice import EXAMPLE, IMPORT_PATH, example_yaml, rayservice_yaml
from atelier.environment import pod_env
from atelier.errors import InvalidInput, NotFound, Unauthorized
from atelier.settings import S3Settings, Settings
from support import REPO


def config(**data) -> ServeConfig:
    return ServeConfig.parse(data)


# -- the config ----------------------------------------------------------------------------------
def test_defaults_are_valid_and_every_field_is_described():
    cfg = ServeConfig()
    assert cfg.gpu == "cpu" and cfg.pool is cfg.pools.cpu
    assert cfg.pools.t4.num_gpus == 1 and cfg.pools.t4.accelerator_type == "T4"
    assert cfg.pools.a100.replica.max_batch_images == 8

    def undocumented(schema, defs, path="ServeConfig"):
        missing = []
        for name, prop in schema.get("properties", {}).items():
            if not prop.get("description"):
                missing.append(f"{path}.{name}")
        return missing

    schema = ServeConfig.model_json_schema()
    missing = undocumented(schema, schema.get("$defs", {}))
    for name, sub in schema.get("$defs", {}).items():
        missing += undocumented(sub, {}, name)
    assert missing == []
    assert all(sub.get("additionalProperties") is False for sub in schema["$defs"].values())


@pytest.mark.parametrize("data, message", [
    ({"limits": {"max_images": 0}}, "limits.max_images: Input should be greater than or equal to 1"),
    ({"limits": {"min_side": 512, "max_width": 256}}, "min_side is larger"),
    ({"limits": {"max_images": 8}}, "max_batch_images (4) is smaller than limits.max_images (8)"),
    ({"pools": {"cpu": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}},
     "min_replicas is larger than max_replicas"),
    ({"pools": {"cpu": {"autoscaling": {"min_replicas": 1, "initial_replicas": 5}}}},
     "initial_replicas must lie between"),
    ({"pools": {"cpu": {"autoscaling": {"target_ongoing_requests": 0}}}}, "greater than 0"),
    ({"gpu": "t4", "pools": {"t4": {"num_gpus": 0}}}, "num_gpus must be positive"),
    ({"gpu": "h100"}, "gpu: unknown pool 'h100': expected one of cpu, t4, a100"),
    ({"defaults": {"steps": 500}}, "defaults.steps is above limits.max_steps"),
    ({"base_models": {"../up": "tiny"}}, "invalid model name '../up'"),
    ({"default_model": "a/b"}, "default_model: invalid model name"),
    ({"preload": ["ok", "s3://b/x"]}, "preload.1: invalid version"),
    ({"pools": {"cpu": {"replcia": {}}}}, "pools.cpu.replcia: unknown key"),
    ({"auth": {"api_key": "secret"}}, "auth.api_key: unknown key"),
])
def test_bad_configs_are_refused_naming_the_field(data, message):
    with pytest.raises(InvalidInput) as caught:
        ServeConfig.parse(data)
    assert message in str(caught.value)


def test_scale_to_zero_is_allowed():
    cfg = config(pools={"cpu": {"autoscaling": {"min_replicas": 0, "max_replicas": 3,
                                                "downscale_to_zero_delay_s": 600}}})
    assert cfg.pool.autoscaling.to_serve() == {
        "min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 4.0,
        "upscale_delay_s": 5.0, "downscale_delay_s": 120.0, "downscale_to_zero_delay_s": 600.0,
    }


def test_config_files_load_with_flags_on_top(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("gpu: a100\nlimits:\n  max_steps: 60\n")
    cfg = ServeConfig.load(path)
    assert cfg.gpu == "a100" and cfg.limits.max_steps == 60
    assert ServeConfig.load(path, gpu="t4", name=None).gpu == "t4"
    with pytest.raises(NotFound):
        ServeConfig.load(tmp_path / "missing.yaml")
    path.write_text("gpu: [unclosed\n")
    with pytest.raises(InvalidInput, match="not valid YAML"):
        ServeConfig.load(path)
    path.write_text("limits:\n  max_stepz: 60\n")
    with pytest.raises(InvalidInput, match=r"serve.yaml: limits.max_stepz: unknown key"):
        ServeConfig.load(path)


# -- the request it bounds -----------------------------------------------------------------------
def test_the_request_model_carries_the_configured_limits_and_defaults():
    cfg = config(limits={"max_images": 2, "max_steps": 30, "max_width": 256, "max_height": 128,
                         "min_side": 64, "max_prompt_chars": 20, "max_guidance_scale": 10},
                 defaults={"steps": 12, "guidance_scale": 5}, default_model="tiny")
    Body = request_model(cfg)
    body = Body(prompt="a ring")
    assert (body.model, body.n, body.steps, body.guidance_scale, body.width) == ("tiny", 1, 12, 5, None)
    assert body.response_format == "b64_json"
    for change, field in [({"n": 3}, "n"), ({"steps": 31}, "steps"), ({"width": 264}, "width"),
                          ({"height": 136}, "height"), ({"width": 56}, "width"),
                          ({"prompt": "x" * 21}, "prompt"), ({"negative_prompt": "x" * 21}, "negative_prompt"),
                          ({"guidance_scale": 11}, "guidance_scale"), ({"seed": 2**32}, "seed"),
                          ({"scheduler": "heun"}, "scheduler"), ({"model": "../x"}, "model"),
                          ({"extra": 1}, "extra")]:
        with pytest.raises(ValidationError) as caught:
            Body(**{"prompt": "a ring", **change})
        assert [e["loc"][0] for e in caught.value.errors()] == [field], change
    with pytest.raises(ValidationError, match="multiple of 8"):
        Body(prompt="a", width=100)
    with pytest.raises(ValidationError, match="png returns one image"):
        Body(prompt="a", n=2, response_format="png")
    with pytest.raises(ValidationError, match="seed \\+ n - 1"):
        Body(prompt="a", n=2, seed=2**32 - 1)
    schema = Body.model_json_schema()["properties"]
    assert schema["n"]["maximum"] == 2 and schema["steps"]["default"] == 12
    assert schema["prompt"]["maxLength"] == 20 and schema["n"]["description"]


@pytest.mark.parametrize("body", [
    {"prompt": "a"}, {"prompt": "a", "n": 2, "seed": 7.0}, {"prompt": "a", "width": 64.0},
    {"prompt": "a", "seed": False}, {"prompt": "a", "n": True}, {"prompt": "a", "n": "2"},
    {"prompt": "a", "guidance_scale": True}, {"prompt": "a", "guidance_scale": 3}, {"prompt": "a", "seed": 7.5},
    {"prompt": "a", "width": 60}, {"prompt": "a", "width": 72}, {"prompt": "a", "model": None},
    {"prompt": "a", "model": "a..b"}, {"prompt": "a", "model": "Rings"}, {"prompt": "a", "model": "rings:0"},
    {"prompt": "a", "model": "rings:3"}, {"prompt": "a", "response_format": "png", "n": 2},
    {"prompt": "a", "response_format": "png"}, {"prompt": "a", "n": 2, "seed": 2**32 - 1},
    {"prompt": "a", "n": 2, "seed": 2**32 - 2}, {"prompt": "a", "n": 2, "seed": None},
])
def test_the_request_schema_takes_exactly_what_the_server_takes(body):
    """The OpenAPI document is the contract a client (or schemathesis) reads: the JSON Schema
    and the pydantic model agree on every body, strict types and cross-field rules included."""
    from jsonschema import Draft202012Validator

    Body = request_model(config(limits={"max_images": 2, "min_side": 64, "max_width": 128},
                                default_model="tiny"))
    try:
        Body.model_validate_json(json.dumps(body))
        served = True
    except ValidationError:
        served = False
    assert Draft202012Validator(Body.model_json_schema()).is_valid(body) == served


def test_the_client_side_request_leaves_unset_fields_to_the_server():
    body = GenerationRequest(prompt="a ring", model="hoops:2")
    assert body.model_dump(exclude_none=True) == {"prompt": "a ring", "model": "hoops:2", "n": 1,
                                                  "response_format": "b64_json"}
    with pytest.raises(ValidationError):
        GenerationRequest(prompt="a", model="s3://bucket/models/x")


# -- serveConfigV2 -------------------------------------------------------------------------------
def test_serve_config_v2_is_what_serve_accepts_and_carries_the_whole_config():
    from ray.serve.schema import ServeDeploySchema

    cfg = config(gpu="t4", default_model="hoops", http={"port": 9000})
    document = serve_config_v2(cfg, env={"B": "2", "A": "1"})
    ServeDeploySchema.model_validate(document)
    app = document["applications"][0]
    assert app["import_path"] == IMPORT_PATH and app["name"] == "atelier"
    assert list(app["runtime_env"]["env_vars"]) == ["A", "B"]
    assert document["http_options"] == {"host": "127.0.0.1", "port": 9000, "request_timeout_s": 300.0}
    assert ServeConfig.model_validate(app["args"]) == cfg  # the builder reads back the same model
    assert json.dumps(document) == json.dumps(serve_config_v2(cfg, env={"A": "1", "B": "2"}))


def test_the_builder_imports_and_turns_args_into_deployment_options():
    import importlib

    from atelier_serve.app import actor_options, replica_args

    module, attr = IMPORT_PATH.split(":")
    build = getattr(importlib.import_module(module), attr)
    cfg = config(gpu="a100", preload=["hoops"])
    assert build(cfg.model_dump(mode="json")) is not None  # args arrive as a dict from the file
    assert actor_options(cfg.pools.a100) == {"num_cpus": 8.0, "num_gpus": 1.0,
                                             "accelerator_type": "A100", "memory": 48 * 2**30}
    assert actor_options(cfg.pools.cpu) == {"num_cpus": 1.0}
    args = replica_args(cfg)
    # Autoscaling is not a constructor argument: changing it restarts no replica.
    assert "autoscaling" not in json.dumps(args) and args["preload"] == ["hoops"]
    with pytest.raises(InvalidInput, match="limits.max_images"):
        build({"limits": {"max_images": 0}})


def test_rayservice_config_binds_every_address_and_keeps_keys_out():
    settings = Settings(s3=S3Settings(endpoint="http://minio.storage:9000", bucket="models",
                                      credentials_file="/home/me/.aws/credentials"))
    text = rayservice_yaml(ServeConfig(gpu="t4"), settings)
    assert text.startswith("# serveConfigV2")
    document = yaml.safe_load(text)
    assert document["http_options"]["host"] == "0.0.0.0"
    env = document["applications"][0]["runtime_env"]["env_vars"]
    assert env == {"ATELIER_HOME": "/var/lib/atelier", "ATELIER_S3__BUCKET": "models",
                   "ATELIER_S3__ENDPOINT": "http://minio.storage:9000", "ATELIER_S3__REGION": "us-east-1"}
    assert "credentials" not in text.lower().replace("api_keys", "")
    # The embedded S3 is on the submitter's loopback: a cluster gets the default AWS endpoint.
    assert "ATELIER_S3__ENDPOINT" not in pod_env(Settings(s3=S3Settings()))
    assert rayservice_yaml(ServeConfig(gpu="t4"), settings) == text


def test_the_committed_example_is_what_the_generator_writes():
    committed = REPO / EXAMPLE
    assert committed.read_text() == example_yaml(), \
        "regenerate it: make generate"
    document = yaml.safe_load(committed.read_text())
    args = ServeConfig.model_validate(document["applications"][0]["args"])
    assert args.gpu == "t4" and str(args.auth.api_keys_file) == "/etc/atelier/api-keys"


def test_cli_writes_the_serve_config(tmp_path, monkeypatch, capsys):
    from atelier.cli.main import main

    monkeypatch.setenv("ATELIER_HOME", str(tmp_path / "home"))
    out = tmp_path / "rayservice" / "serve.yaml"
    assert main(["serve", "config", "--gpu", "a100", "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["applications"][0]["args"]["gpu"] == "a100"
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits:\n  max_images: 100\n")
    assert main(["serve", "config", "--config", str(bad)]) == 2
    assert "limits.max_images: Input should be less than or equal to 64" in capsys.readouterr().err


# -- API keys ------------------------------------------------------------------------------------
def test_api_keys_come_from_a_file_or_the_environment_and_rotate(tmp_path, monkeypatch):
    from atelier.endpoint.keys import parse_keys
    from atelier_serve.auth import ApiKeys

    assert parse_keys("# comment\n\nk1\nk2, k3  # trailing\n") == ["k1", "k2", "k3"]
    path = tmp_path / "keys"
    path.write_text("first\n")
    monkeypatch.setenv("TEST_KEYS", "from-env")
    keys = ApiKeys(Auth(api_keys_file=path, api_keys_env="TEST_KEYS"))
    keys.check("Bearer first")
    keys.check("bearer from-env")
    for header in (None, "", "Bearer", "Bearer wrong", "first", "Basic first"):
        with pytest.raises(Unauthorized):
            keys.check(header)
    path.write_text("second-key\n")  # rotated in place, as a Secret volume is
    keys.check("Bearer second-key")
    with pytest.raises(Unauthorized):
        keys.check("Bearer first")
    path.unlink()  # gone: only the environment's key is left
    with pytest.raises(Unauthorized):
        keys.check("Bearer second-key")
    keys.check("Bearer from-env")


def test_auth_without_any_key_refuses_to_start_unless_turned_off(tmp_path, monkeypatch):
    from atelier_serve.auth import ApiKeys

    monkeypatch.delenv("ATELIER_API_KEYS", raising=False)
    with pytest.raises(InvalidInput, match="no API key was found"):
        ApiKeys(Auth(api_keys_file=tmp_path / "missing"))
    ApiKeys(Auth(required=False)).check(None)


# -- where replicas run ----------------------------------------------------------------------------
@pytest.mark.parametrize("num_gpus, device, dtype", [
    (0, "cpu", "float32"),
    pytest.param(1, "cuda", "float16", marks=pytest.mark.gpu),
])
def test_replicas_run_fp32_on_cpu_and_fp16_on_a_gpu(tmp_path, num_gpus, device, dtype):
    import torch

    from atelier_serve.pipelines import Job, ModelCache, placement

    assert placement(num_gpus, "auto") == (device, getattr(torch, dtype))
    assert placement(num_gpus, "bfloat16")[1] == torch.bfloat16
    cache = ModelCache(Settings(home=tmp_path), base_models={"tiny": "tiny"}, device=device,
                       dtype=getattr(torch, dtype))
    loaded = cache.load("tiny")
    assert loaded.pipe.unet.dtype == getattr(torch, dtype) and loaded.pipe.device.type == device
    job = Job(loaded=loaded, prompt="a ring", negative_prompt=None, n=2, seed=0, steps=3,
              guidance_scale=7.5, width=64, height=64, scheduler="euler")
    [pngs] = cache.run([job])
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)
    assert cache.bytes_loaded() > 0
    loaded.__del__()  # what Serve's LRU calls on eviction
    assert cache.bases == {} and cache.bytes_loaded() == 0


# -- deploying on this machine -----------------------------------------------------------------------
def test_models_to_serve_are_checked_preloaded_and_resolved_as_requests_name_them(settings, tiny_model):
    import torch

    from atelier.endpoint.deploy import with_models
    from atelier.registry import Registry
    from atelier.storage import Storage
    from atelier_serve.pipelines import ModelCache

    registry = Registry(Storage(settings))
    fields = dict(method="full", base_model="tiny", concepts=[], hyperparameters={},
                  dataset_sha256="0" * 64)
    for _ in range(2):
        registry.publish(tiny_model, name="rings", **fields)
    with pytest.raises(NotFound, match="nope"):
        with_models(settings, ServeConfig(), ["rings", "nope"])

    deployed = with_models(settings, ServeConfig(preload=["tiny"]), ["rings", "tiny"])
    assert deployed.default_model == "rings" and deployed.preload == ["tiny", "rings"]
    keys = deployed.auth.api_keys_file
    assert keys.stat().st_mode & 0o077 == 0 and len(keys.read_text().splitlines()[-1]) >= 32
    # No key file is made where auth is off or a file is named.
    assert with_models(settings, ServeConfig(auth={"required": False}), []).auth.api_keys_file is None

    # A replica preloads a model under the id the ingress sends its requests with.
    cache = ModelCache(settings, base_models={"tiny": "tiny"}, device="cpu", dtype=torch.float32)
    assert [cache.model_id(ref) for ref in ("tiny", "rings", "rings:1")] == ["tiny", "rings:2", "rings:1"]


def test_the_committed_openapi_document_is_what_the_app_serves():
    from atelier_serve.openapi import OPENAPI, openapi_json

    text = openapi_json()
    assert (REPO / OPENAPI).read_text() == text, "regenerate it: make generate"
    document = json.loads(text)
    generations = document["paths"]["/v1/images/generations"]["post"]
    assert set(generations["responses"]["200"]["content"]) == {"application/json", "image/png"}
    assert {"401", "422", "424", "503"} <= set(generations["responses"])
    # The default config's bounds are the documented ones.
    body = document["components"]["schemas"]["GenerationRequest"]["properties"]
    assert body["n"]["maximum"] == ServeConfig().limits.max_images
