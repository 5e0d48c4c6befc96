"""GPU paths of the training job: fp16 autocast, 8-bit AdamW, xformers attention, NCCL."""

from __future__ import annotations

import pytest

from atelier.rayjobs import Jobs
from atelier.registry import Registry
from atelier.storage import Storage
from atelier.training.config import TrainConfig
from atelier.training.submit import progress, submit

pytestmark = [pytest.mark.integration, pytest.mark.gpu]


@pytest.mark.parametrize("attention", ["sdpa", "xformers"])
def test_fp16_8bit_adam_job_trains_and_registers_on_gpu(cluster, concepts_file, attention):
    if attention == "xformers":
        pytest.importorskip("xformers")
    pytest.importorskip("bitsandbytes")
    cfg = TrainConfig(max_train_steps=20, checkpoint_every=20, learning_rate=1e-4, use_gpu=True,
                      mixed_precision="fp16", use_8bit_adam=True, attention=attention,
                      gradient_checkpointing=True, model_name=f"gpu-{attention}")
    jobs = Jobs(cluster)
    job_id, _ = submit(cluster, concepts_file, cfg, concepts=None)
    assert jobs.wait(job_id, timeout_s=600) == "SUCCEEDED", jobs.logs(job_id)[-3000:]
    assert progress(jobs, job_id).published
    cards = Registry(Storage(cluster)).list()
    assert any(c.name.startswith(f"gpu-{attention}") for c in cards)
