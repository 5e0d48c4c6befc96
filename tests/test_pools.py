"""The node pools: one table that the serve config, the training config and the RayJob renderer
all read, so none of them can name, size or place a pool differently from the others."""

from __future__ import annotations

import json

import pytest
import yaml

from atelier import pools
from atelier.endpoint import ServeConfig
from atelier.endpoint.rayservice import rayservice_yaml
from atelier.environment import pod_env
from atelier.errors import InvalidInput
from atelier.kube import render_rayjob
from atelier.settings import KubeSettings, S3Settings, Settings
from atelier.training.config import TrainConfig
from atelier.training.spec import TrainJobSpec

CLUSTER = Settings(s3=S3Settings(endpoint="http://minio.storage:9000", bucket="shop"),
                   kube=KubeSettings(image="registry.example/atelier:test"))


def rayjob(gpu: str, *, pool: str | None = None, **config) -> dict:
    spec = TrainJobSpec(config=TrainConfig(use_gpu=True, gpu_type=gpu, **config),
                        dataset_uri="s3://shop/datasets/0123", dataset_sha256="ab" * 32,
                        run_name="shop")
    return render_rayjob(spec, CLUSTER, pool or gpu, "shop", "ml")


def test_serve_config_training_config_and_rayjob_all_read_the_one_table():
    serve_names = ServeConfig.model_json_schema()["properties"]["gpu"]["enum"]
    assert serve_names == list(ServeConfig().pools.model_dump()) == list(pools.POOLS)
    (gpu_types,) = [t["enum"] for t in
                    TrainConfig.model_json_schema()["properties"]["gpu_type"]["anyOf"] if "enum" in t]
    assert gpu_types == list(pools.GPU_POOLS) == ["t4", "a100"]
    for name, node in pools.GPU_POOLS.items():
        serving = getattr(ServeConfig().pools, name)
        assert (serving.num_gpus, serving.accelerator_type) == (node.gpus, node.ray_accelerator_type)
        (worker,) = rayjob(name)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        pod = worker["template"]["spec"]
        assert worker["groupName"] == name
        assert {k: pod[k] for k in ("nodeSelector", "tolerations")} | \
            {"resources": pod["containers"][0]["resources"]} == node.kubernetes()


def test_an_unknown_pool_gets_the_same_message_everywhere():
    with pytest.raises(InvalidInput, match="gpu: unknown pool 'h100': expected one of cpu, t4, a100"):
        ServeConfig.parse({"gpu": "h100"})
    with pytest.raises(InvalidInput,
                       match="gpu_type: unknown GPU pool 'cpu': expected one of t4, a100"):
        TrainConfig.load(None, gpu_type="cpu")
    with pytest.raises(InvalidInput, match="gpu: unknown GPU pool 'v100': expected one of t4, a100"):
        rayjob("a100", pool="v100")


def test_a_partial_pool_override_keeps_the_rest_of_the_pools_defaults():
    cfg = ServeConfig.parse({"gpu": "t4", "pools": {"t4": {"autoscaling": {"max_replicas": 8},
                                                           "replica": {"max_models": 3}}}})
    t4 = ServeConfig().pools.t4
    assert cfg.pool.autoscaling.max_replicas == 8 and cfg.pool.replica.max_models == 3
    assert cfg.pool.model_dump(exclude={"autoscaling", "replica"}) == \
        t4.model_dump(exclude={"autoscaling", "replica"})
    assert cfg.pool.replica.memory_budget_gb == t4.replica.memory_budget_gb
    assert cfg.pool.autoscaling.target_ongoing_requests == t4.autoscaling.target_ongoing_requests
    assert ServeConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # the builder's args


def test_the_t4_computes_in_float16_only_and_says_so_for_training_and_serving():
    with pytest.raises(InvalidInput, match="mixed_precision bf16: the t4 pool does not compute in "
                                           "bfloat16"):
        TrainConfig.load(None, gpu_type="t4", mixed_precision="bf16")
    with pytest.raises(InvalidInput, match="pools.t4.dtype: the t4 pool does not compute in bfloat16"):
        ServeConfig.parse({"gpu": "t4", "pools": {"t4": {"dtype": "bfloat16"}}})
    assert TrainConfig(gpu_type="a100", mixed_precision="bf16").gpu_type == "a100"
    assert ServeConfig.parse({"gpu": "a100", "pools": {"a100": {"dtype": "bfloat16"}}})
    assert ServeConfig.parse({"pools": {"cpu": {"dtype": "float16"}}})  # CPU replicas may


def test_auto_on_a_gpu_is_a_dtype_every_gpu_pool_computes_in(monkeypatch):
    import torch

    from atelier_jobs.dreambooth import _weight_dtype
    from atelier_serve.pipelines import placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    served = str(placement(1, "auto")[1]).removeprefix("torch.")
    trained = str(_weight_dtype(TrainConfig(mixed_precision="auto"), on_gpu=True)).removeprefix(
        "torch.")
    for node in pools.GPU_POOLS.values():
        assert served in node.half_dtypes and trained in node.half_dtypes


def test_a_replica_or_a_worker_bigger_than_its_pools_pod_is_refused():
    for name in pools.POOLS:  # the defaults fit
        rayservice_yaml(ServeConfig(gpu=name), CLUSTER)
    with pytest.raises(InvalidInput, match=r"pools.t4: asks for 8 CPUs, more than a t4 worker "
                                           r"pod offers Ray \(6\)"):
        rayservice_yaml(ServeConfig.parse({"gpu": "t4", "pools": {"t4": {"num_cpus": 8}}}), CLUSTER)
    with pytest.raises(InvalidInput, match="pools.a100: asks for 60 GiB of memory"):
        rayservice_yaml(ServeConfig.parse({"gpu": "a100", "pools": {"a100": {"memory_gb": 60}}}),
                        CLUSTER)
    with pytest.raises(InvalidInput, match="pools.t4: asks for 2 GPUs"):
        rayservice_yaml(ServeConfig.parse({"gpu": "t4", "pools": {"t4": {"num_gpus": 2}}}), CLUSTER)
    with pytest.raises(InvalidInput, match="cpus_per_worker: asks for 11 CPUs"):
        rayjob("a100", cpus_per_worker=11)
    assert rayjob("a100", cpus_per_worker=10)


def test_a_gpu_pool_refuses_another_gpus_accelerator_type():
    with pytest.raises(InvalidInput, match="accelerator_type 'T4' is not the a100 pool's GPU"):
        ServeConfig.parse({"gpu": "a100", "pools": {"a100": {"accelerator_type": "T4"}}})


def test_rayjob_and_rayservice_pods_get_the_one_pod_environment():
    rayservice = yaml.safe_load(rayservice_yaml(ServeConfig(gpu="t4"), CLUSTER))
    assert rayservice["applications"][0]["runtime_env"]["env_vars"] == pod_env(CLUSTER)
    (worker,) = rayjob("t4")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    env = worker["template"]["spec"]["containers"][0]["env"]
    assert {e["name"]: e["value"] for e in env} == pod_env(CLUSTER)


def test_the_pools_dump_as_plain_data_with_their_kubernetes_fields():
    dumped = json.loads(json.dumps(pools.dump()))
    assert list(dumped) == ["cpu", "t4", "a100"]
    assert dumped["cpu"]["kubernetes"] == {"resources": {"requests": {"cpu": "6", "memory": "24Gi"},
                                                         "limits": {"cpu": "6", "memory": "24Gi"}}}
    a100 = dumped["a100"]["kubernetes"]
    assert a100["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert a100["resources"]["limits"] == {"cpu": "10", "memory": "72Gi", "nvidia.com/gpu": 1}
    assert {name: pools.NodePool.model_validate(
        {k: v for k, v in data.items() if k != "kubernetes"}) for name, data in dumped.items()} \
        == pools.POOLS
    schema = pools.NodePool.model_json_schema()
    assert schema["additionalProperties"] is False
    assert all(prop.get("description") for prop in schema["properties"].values())
