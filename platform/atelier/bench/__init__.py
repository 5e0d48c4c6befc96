"""Measuring and costing the GPU pools: the price catalogue and the cost model (`cost`), and the
roofline estimate for a pool not measured (`roofline`). Their data files ship in this package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped(name: str) -> Path:
    """A data file of this package (prices.yaml, gpus.yaml)."""
    return Path(str(resources.files(__name__).joinpath(name)))
