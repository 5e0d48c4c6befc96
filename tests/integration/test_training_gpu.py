"""GPU paths of the training job through Ray: fp16/bf16 autocast, 8-bit AdamW, xformers or SDPA,
NCCL, and the model served in fp16 — each asserting the dtypes and optimizer the job really used.

The same cells run in-process on CUDA in tests/test_training_precision.py; these go through the
Jobs API, Ray Train and the registry as a user's job does.
"""

from __future__ import annotations

import pytest
import torch

from atelier.rayjobs import Jobs
from atelier.training import events
from atelier.training.config import TrainConfig
from atelier.training.progress import progress
from atelier.training.submit import submit

pytestmark = [pytest.mark.integration, pytest.mark.gpu]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("attention", ["sdpa", "xformers"])
def test_mixed_precision_8bit_adam_job_trains_registers_and_serves_on_gpu(
        cluster, concepts_file, precision, attention):
    from atelier.catalogue.schema import ConceptsFile
    from atelier.models.load import load_model

    if attention == "xformers":
        pytest.importorskip("xformers")
    pytest.importorskip("bitsandbytes")
    concept = ConceptsFile.load(concepts_file).concepts[0]
    name = f"gpu-{precision}-{attention}"
    cfg = TrainConfig(max_train_steps=20, checkpoint_every=10, learning_rate=1e-4, use_gpu=True,
                      mixed_precision=precision, use_8bit_adam=True, attention=attention,
                      gradient_checkpointing=True, model_name=name)
    jobs = Jobs(cluster)
    job_id, _ = submit(cluster, concepts_file, cfg, concepts=[concept.name])
    assert jobs.wait(job_id, timeout_s=600) == "SUCCEEDED", jobs.logs(job_id)[-3000:]
    assert progress(jobs, job_id).published == [f"{name}-{concept.name}:1"]

    [p] = {e.model_dump_json(): e for e in map(events.parse, jobs.logs(job_id).splitlines())
           if isinstance(e, events.Precision)}.values()  # Ray may forward a worker's line twice
    half = {"fp16": "float16", "bf16": "bfloat16"}[precision]
    assert p.computed_in == half
    assert p.weights["unet"] == events.ModuleDtypes(frozen=[], trained=["float32"])
    assert p.weights["vae"].frozen == [half] and p.weights["text_encoder"].frozen == [half]
    assert p.optimizer == "bitsandbytes.optim.adamw.AdamW8bit" and "uint8" in p.optimizer_state_bytes
    assert p.loss_scaling is (precision == "fp16") and p.gradient_checkpointing is True
    assert p.attention == (["XFormersAttnProcessor"] if attention == "xformers" else ["AttnProcessor2_0"])

    pipe = load_model(f"{name}-{concept.name}", settings=cluster, dtype=torch.float16, device="cuda")
    images = pipe(concept.instance_prompt, num_inference_steps=3, height=64, width=64,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert pipe.unet.dtype == torch.float16 and torch.isfinite(images).all() and images.std() > 0
