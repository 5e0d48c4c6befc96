"""The cost model (atelier.bench.cost): prices from a dated, sourced catalogue; USD per 1000 images
at a latency target; USD per fine-tune; what idle replicas and cold starts add; break-even traffic."""

from __future__ import annotations

import math

import pytest
import yaml

from atelier import pools
from atelier.bench.cost import (
    Catalogue,
    Level,
    Pool,
    break_even,
    usd_per_1000_images,
    usd_per_finetune,
)
from atelier.errors import InvalidInput


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return Catalogue.load()


def test_the_shipped_catalogue_should_price_every_gpu_pool_with_a_source_and_a_date(catalogue):
    gpu_pools = [name for name, pool in pools.POOLS.items() if pool.gpus]
    assert sorted(catalogue.pools) == sorted(gpu_pools)
    for pool in gpu_pools:
        price = catalogue.price(pool)
        assert price.usd_per_gpu_hour and price.usd_per_gpu_hour > 0, pool
        assert price.source and price.read.year >= 2026


def test_a_shared_instance_should_cost_its_share_per_gpu(catalogue):
    assert catalogue.price("a100").usd_per_gpu_hour == pytest.approx(21.957642 / 8)
    assert catalogue.price("a100", instance="gcp-a2-highgpu-1g").usd_per_gpu_hour == 3.67


def test_a_price_with_a_missing_part_should_stay_unknown_rather_than_guessed(catalogue):
    assert catalogue.price("t4", instance="gcp-n1-standard-8-t4").usd_per_gpu_hour is None
    assert catalogue.price("t4", market="spot").usd_per_gpu_hour is None


def test_a_price_made_of_parts_should_be_their_sum(tmp_path):
    data = {"instances": {"vm-t4": {"cloud": "gcp", "gpu": "T4", "gpus": 1,
                                    "parts": {"gpu": 0.35, "vm": 0.38}, "source": "test",
                                    "read": "2026-11-30"}},
            "pools": {"t4": "vm-t4"}}
    (tmp_path / "prices.yaml").write_text(yaml.safe_dump(data))
    assert Catalogue.load(tmp_path / "prices.yaml").price("t4").usd_per_gpu_hour == \
        pytest.approx(0.73)


@pytest.mark.parametrize(("change", "message"), [
    ({"pools": {"t4": "aws-p4d.24xlarge"}}, "has a A100, the pool a T4"),
    ({"pools": {"h100": "aws-p4d.24xlarge"}}, "no such pool"),
    ({"pools": {"t4": "nowhere"}}, "no instance 'nowhere'"),
])
def test_a_user_catalogue_that_misprices_a_pool_should_be_refused_with_its_place(
        tmp_path, catalogue, change, message):
    data = catalogue.model_dump(mode="json", exclude_none=True)
    data.update(change)
    for entry in data["instances"].values():
        if "parts" in entry:
            entry.pop("on_demand", None)
    (tmp_path / "prices.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(InvalidInput, match=message) as raised:
        Catalogue.load(tmp_path / "prices.yaml")
    assert "prices.yaml" in str(raised.value)


LEVELS = [Level(1, 0.9, 1.2), Level(2, 1.6, 1.4), Level(4, 2.0, 2.3), Level(8, 2.1, 4.5),
          Level(16, 2.2, 3.0, error_rate=0.2)]


def test_should_cost_images_at_the_largest_throughput_whose_p95_meets_the_target():
    usd, level = usd_per_1000_images(LEVELS, usd_per_hour=0.526, p95_target_s=2.5)
    assert level.concurrency == 4  # 8 misses the target, 16 fails too many requests
    assert usd == pytest.approx(0.526 / (2.0 * 3600) * 1000)


def test_should_say_so_when_no_level_meets_the_latency_target():
    assert usd_per_1000_images(LEVELS, usd_per_hour=0.526, p95_target_s=1.0) is None


def test_should_cost_a_fine_tune_by_its_gpu_seconds():
    assert usd_per_finetune(3600 * 1.5, usd_per_gpu_hour=0.526, gpus=2) == pytest.approx(1.578)


def test_an_always_on_pool_should_pay_whole_replicas_for_any_traffic():
    pool = Pool("t4", usd_per_hour=0.5, images_per_s=0.1, min_replicas=1)
    assert pool.usd_per_hour_at(0) == 0.5
    assert pool.usd_per_hour_at(360) == 0.5  # exactly one replica's capacity
    assert pool.usd_per_hour_at(361) == 1.0


def test_a_pool_that_scales_to_zero_should_pay_idle_time_and_cold_starts_between_nothing_and_always_on():
    zero = Pool("t4", usd_per_hour=0.5, images_per_s=0.1, min_replicas=0, idle_timeout_s=300,
                cold_start_s=120)
    assert zero.usd_per_hour_at(0) == 0
    costs = [zero.usd_per_hour_at(rate) for rate in (0.5, 2, 6, 30, 300)]
    assert costs == sorted(costs) and 0 < costs[0] < 0.5 and costs[-1] == pytest.approx(0.5)
    # One image an hour: the replica runs the idle timeout plus a cold start after each.
    rate = 1 / 3600
    expected = (1 - math.exp(-rate * 300) + rate * math.exp(-rate * 300) * 120) * 0.5
    assert zero.usd_per_hour_at(1) == pytest.approx(expected)
    assert zero.cold_start_share(1) == pytest.approx(math.exp(-300 / 3600))
    assert Pool("t4", 0.5, 0.1).cold_start_share(1) == 0


def test_break_even_should_find_where_the_faster_pool_becomes_the_cheaper():
    slow = Pool("t4", usd_per_hour=0.5, images_per_s=0.1)  # 360 images/h per replica
    fast = Pool("a100", usd_per_hour=2.5, images_per_s=1.0)  # 3600 images/h per replica
    (crossing,) = break_even(slow, fast, low=10, high=1e5)
    # Above 1440 images/h the T4 needs a fifth replica: five cost what one A100 does (break-even);
    # above 1800 a sixth makes the T4 the dearer.
    assert crossing == pytest.approx(1440, rel=1e-6)
    assert slow.usd_per_hour_at(crossing * 0.999) < fast.usd_per_hour_at(crossing * 0.999)
    assert slow.usd_per_hour_at(crossing * 1.001) == fast.usd_per_hour_at(crossing * 1.001)
    assert slow.usd_per_hour_at(1801) > fast.usd_per_hour_at(1801)


def test_break_even_should_be_empty_when_one_pool_is_cheaper_at_every_traffic():
    cheap = Pool("t4", usd_per_hour=0.5, images_per_s=1.0)
    dear = Pool("a100", usd_per_hour=2.5, images_per_s=1.0)
    assert break_even(cheap, dear) == []
