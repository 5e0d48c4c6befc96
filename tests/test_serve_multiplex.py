"""The memory budget evicts through Serve's private multiplexing LRU: a Ray that no longer has it
stops a budgeted replica at start with a clear reason, instead of running without a budget."""

from __future__ import annotations

import pytest
from ray.serve import multiplex

from atelier_serve.model import check_multiplex_lru, multiplex_lru


def test_the_installed_serve_has_the_lru_the_budget_needs():
    check_multiplex_lru()


def test_a_serve_without_it_is_refused_at_replica_start(monkeypatch):
    monkeypatch.delattr(multiplex._ModelMultiplexWrapper, "unload_model_lru")
    with pytest.raises(RuntimeError, match="memory_budget_gb"):
        check_multiplex_lru()


def test_a_renamed_lru_is_an_error_not_a_silently_disabled_budget():
    async def load_model(model_id):
        return model_id

    with pytest.raises(RuntimeError, match="cannot evict"):
        multiplex_lru(load_model)
