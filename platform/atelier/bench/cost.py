"""The cost model: what a GPU pool costs per 1000 images at a latency target, per fine-tune, and at
which traffic one pool overtakes another once idle replicas and cold starts are paid for.

Prices come from a catalogue (prices.yaml in this package, or the user's file of the same shape),
each with its source and the date it was read. Everything here is arithmetic on measured (or
estimated) throughput: nothing is measured in this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from atelier import config_file, pools
from atelier.bench import shipped
from atelier.errors import InvalidInput

Market = Literal["on_demand", "spot"]


class Instance(BaseModel):
    """One instance type's hourly price."""

    model_config = ConfigDict(extra="forbid")

    cloud: str
    gpu: str = Field(description="Ray's name of the GPU (pools' ray_accelerator_type): T4, A100.")
    gpus: int = Field(ge=1, description="GPUs of the instance; costs are per GPU (its share).")
    on_demand: float | None = Field(None, gt=0, description="USD per hour; null: not recorded.")
    spot: float | None = Field(None, gt=0, description="USD per hour; null: not recorded.")
    parts: dict[str, float | None] | None = Field(
        None, description="Separately priced parts (VM, GPU), USD per hour: on_demand is their "
        "sum, or unknown while a part is null.")
    source: str = Field(min_length=1)
    read: date = Field(description="When the price was read.")

    @model_validator(mode="after")
    def _price_or_parts(self) -> Instance:
        if self.parts is not None and self.on_demand is not None:
            raise ValueError("give on_demand or its parts, not both")
        return self

    def hourly(self, market: Market = "on_demand") -> float | None:
        """USD per hour for the instance; None while it (or one of its parts) is not recorded.
        Derived here, not stored: the file keeps saying what was read, parts and all."""
        if market == "spot":
            return self.spot
        if self.parts is not None:
            if any(v is None for v in self.parts.values()):
                return None
            return sum(v for v in self.parts.values() if v is not None)
        return self.on_demand

    def per_gpu_hour(self, market: Market = "on_demand") -> float | None:
        price = self.hourly(market)
        return None if price is None else price / self.gpus


class Catalogue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: dict[str, Instance]
    pools: dict[str, str] = Field(description="Pool -> the instance that prices it by default.")

    @model_validator(mode="after")
    def _pools_name_instances_of_their_gpu(self) -> Catalogue:
        for pool, name in self.pools.items():
            if pool not in pools.POOLS:
                raise ValueError(f"pools.{pool}: no such pool ({', '.join(pools.POOLS)})")
            if name not in self.instances:
                raise ValueError(f"pools.{pool}: no instance {name!r} in instances")
            gpu = pools.POOLS[pool].ray_accelerator_type
            if self.instances[name].gpu != gpu:
                raise ValueError(f"pools.{pool}: {name} has a {self.instances[name].gpu}, the "
                                 f"pool a {gpu}")
        return self

    @classmethod
    def load(cls, path: Path | None = None) -> Catalogue:
        """The user's catalogue at `path`, or the one shipped in this package."""
        path = path or shipped("prices.yaml")
        return config_file.validate(cls, config_file.read_mapping(path, "price catalogue"),
                                    where=str(path))

    def price(self, pool: str, market: Market = "on_demand",
              instance: str | None = None) -> Price:
        """One GPU of `pool` for an hour, from `instance` or the pool's default."""
        name = instance or self.pools.get(pool)
        if name is None:
            raise InvalidInput(f"the price catalogue prices no pool {pool!r}", where="pools")
        found = self.instances[name]
        return Price(pool, name, found.per_gpu_hour(market), market, found.source, found.read)


def priced_pool(name: str) -> str:
    """`name` if it is a GPU pool (what a measured pool may be priced as); else InvalidInput."""
    gpu_pools = [p for p, node in pools.POOLS.items() if node.gpus]
    if name not in gpu_pools:
        raise InvalidInput(f"{name!r} is not a GPU pool ({', '.join(gpu_pools)})",
                           where="--prices-as")
    return name


@dataclass(frozen=True)
class Price:
    pool: str
    instance: str
    usd_per_gpu_hour: float | None  # None: not recorded in the catalogue
    market: Market
    source: str
    read: date


@dataclass(frozen=True)
class Level:
    """One measured load level of a pool: its sustained throughput and tail latency."""

    concurrency: float
    images_per_s: float
    p95_s: float
    error_rate: float = 0.0


def usd_per_1000_images(levels: Sequence[Level], usd_per_hour: float, p95_target_s: float,
                        max_error_rate: float = 0.01) -> tuple[float, Level] | None:
    """USD per 1000 images at the largest sustained throughput whose p95 meets the target (and
    whose errors stay under `max_error_rate`), with that level; None when no level meets it."""
    meeting = [lv for lv in levels if lv.p95_s <= p95_target_s and lv.error_rate <= max_error_rate
               and lv.images_per_s > 0]
    if not meeting:
        return None
    best = max(meeting, key=lambda lv: lv.images_per_s)
    return usd_per_hour / (best.images_per_s * 3600) * 1000, best


def usd_per_finetune(seconds: float, usd_per_gpu_hour: float, gpus: int = 1) -> float:
    return seconds / 3600 * usd_per_gpu_hour * gpus


@dataclass(frozen=True)
class Pool:
    """A serving pool for the traffic model: per-replica capacity at the latency target, price,
    and the autoscaling that decides what is paid while idle."""

    name: str
    usd_per_hour: float  # one replica (one GPU)
    images_per_s: float  # one replica's sustained throughput at the latency target
    min_replicas: int = 1
    idle_timeout_s: float = 300.0  # a replica (and its node) stays this long after its last request
    cold_start_s: float = 0.0  # node + image + model load, paid before the first image

    def replicas(self, images_per_hour: float) -> int:
        """Replicas busy enough to carry the traffic."""
        need = math.ceil(images_per_hour / (self.images_per_s * 3600)) if images_per_hour else 0
        return max(self.min_replicas, need)

    def usd_per_hour_at(self, images_per_hour: float) -> float:
        """What an hour of this traffic costs. With min_replicas 0 and one replica's worth of
        traffic, the replica runs only while requests keep coming: for Poisson arrivals at rate r
        it is down for the part of each gap beyond the idle timeout T, a share e^(-rT) of the
        time; each of the r e^(-rT) restarts per second pays the cold start too."""
        n = self.replicas(images_per_hour)
        if self.min_replicas > 0 or n > 1:
            return n * self.usd_per_hour
        if images_per_hour == 0:
            return 0.0
        rate = images_per_hour / 3600
        idle_share = math.exp(-rate * self.idle_timeout_s)
        paid = (1 - idle_share) + rate * idle_share * self.cold_start_s
        return min(1.0, paid) * self.usd_per_hour

    def cold_start_share(self, images_per_hour: float) -> float:
        """Share of requests that find no replica and wait for a cold start."""
        if self.min_replicas > 0 or images_per_hour == 0:
            return 0.0
        return math.exp(-images_per_hour / 3600 * self.idle_timeout_s)


def break_even(a: Pool, b: Pool, low: float = 1.0, high: float = 1e6,
               points: int = 400) -> list[float]:
    """Traffic levels (images per hour) between `low` and `high` at which the cheaper of the two
    pools changes: where one overtakes the other. Costs are step functions of traffic (whole
    replicas), so each crossing is found on a log grid and then narrowed by bisection."""
    def sign(rate: float) -> int:
        diff = a.usd_per_hour_at(rate) - b.usd_per_hour_at(rate)
        return (diff > 1e-12) - (diff < -1e-12)

    grid = [low * (high / low) ** (i / (points - 1)) for i in range(points)]
    found = []
    last_rate, last_sign = grid[0], sign(grid[0])
    for rate in grid[1:]:
        now = sign(rate)
        if now != 0 and now != last_sign:
            if last_sign != 0:
                found.append(_bisect(sign, last_rate, rate, last_sign))
            last_sign = now
        last_rate = rate if now != 0 else last_rate
    return found


def _bisect(sign: Callable[[float], int], lo: float, hi: float, lo_sign: int) -> float:
    for _ in range(60):
        mid = (lo + hi) / 2
        if sign(mid) == lo_sign:
            lo = mid
        else:
            hi = mid
    return hi
