"""DreamBooth jobs for real: the Jobs API, Ray Train, SeaweedFS, the registry, killed workers."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from atelier.bench.faults import WORKER_PID, job_events, wait_for_durable_checkpoint
from atelier.rayjobs import Jobs
from atelier.registry import Registry
from atelier.storage import Storage
from atelier.training import events
from atelier.training.config import TrainConfig
from atelier.training.progress import progress
from atelier.training.submit import submit

pytestmark = pytest.mark.integration

def wait(jobs: Jobs, job_id: str, timeout_s: float = 300) -> str:
    status = jobs.wait(job_id, timeout_s=timeout_s)
    if status != "SUCCEEDED":
        print(jobs.logs(job_id)[-5000:])
    return status


def checkpoints(storage: Storage, run: str) -> list[str]:
    """Ray Train's checkpoint folders of a run, oldest first (its snapshot file excluded)."""
    return sorted(f"{run}/{n}" for n in storage.list_dir(run)
                  if n.startswith("checkpoint_") and not n.endswith(".json"))


def exported(storage: Storage, checkpoint: str) -> dict[str, torch.Tensor]:
    """Every tensor of the model a checkpoint exports (its `model/` folder), keyed by file and name."""
    from safetensors.torch import load_file

    folder = storage.fetch_cached(checkpoint)
    return {f"{path.relative_to(folder)}:{k}": v for path in sorted((folder / "model").rglob("*.safetensors"))
            for k, v in load_file(path).items()}


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """The tensors of two exports that are not exactly equal, with their largest difference."""
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}


def render(pipe, prompt: str) -> torch.Tensor:
    out = pipe(prompt, num_inference_steps=3, height=64, width=64, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    return out.images


def test_job_trains_two_concepts_checkpoints_to_s3_and_registers_loadable_models(cluster, concepts_file):
    from atelier.catalogue.schema import ConceptsFile
    from atelier.models.load import load_model, load_pipeline

    concepts = ConceptsFile.load(concepts_file).concepts[:2]
    cfg = TrainConfig(max_train_steps=20, checkpoint_every=10, learning_rate=1e-4,
                      model_name="jobtest")
    job_id, spec = submit(cluster, concepts_file, cfg, concepts=[c.name for c in concepts])
    jobs = Jobs(cluster)
    assert wait(jobs, job_id) == "SUCCEEDED"
    p = progress(jobs, job_id)
    assert p.published == [f"jobtest-{c.name}:1" for c in concepts]

    storage = Storage(cluster)
    registry = Registry(storage)
    base = load_pipeline("tiny", settings=cluster)
    for concept in concepts:
        uri, card = registry.get(f"jobtest-{concept.name}")
        assert card.method == "full" and card.base_model == "tiny"
        assert [c.identifier for c in card.concepts] == [concept.identifier]
        assert card.hyperparameters["learning_rate"] == 1e-4
        assert card.dataset_sha256 == spec.dataset_sha256
        assert card.final_loss is not None and card.code_version
        # Checkpoints live in S3 through Ray Train, each with its manifest and validation images.
        run = card.run
        found = checkpoints(storage, run)
        assert len(found) == 2
        for checkpoint in found:
            manifest = storage.read_manifest(checkpoint)
            paths = {f.path for f in manifest.files}
            assert "state.pt" in paths and any(x.startswith("validation/") for x in paths)
        # The registered model loads by name and generates something other than the base.
        tuned = load_model(f"jobtest-{concept.name}", settings=cluster)
        a, b = render(tuned, concept.instance_prompt), render(base, concept.instance_prompt)
        assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_the_model_learns_on_a_fixed_evaluation_batch(cluster, concepts_file):
    import json

    from atelier.catalogue.schema import ConceptsFile

    name = ConceptsFile.load(concepts_file).concepts[2].name
    cfg = TrainConfig(max_train_steps=60, checkpoint_every=60, learning_rate=1e-4, model_name="learn")
    job_id, _ = submit(cluster, concepts_file, cfg, concepts=[name])
    jobs = Jobs(cluster)
    assert wait(jobs, job_id) == "SUCCEEDED"
    last = job_events(jobs, job_id, events.Checkpoint)[-1]
    uri, card = Registry(Storage(cluster)).get(f"learn-{name}")
    assert last.step == 60
    # eval_loss is measured on fixed noise and timesteps, so it is comparable across steps
    storage = Storage(cluster)
    folder = storage.fetch_cached(checkpoints(storage, card.run)[-1])
    training = json.loads((folder / "training.json").read_text())
    # Measured (seed 0): 1.0922 -> 0.6963 after 60 steps, 36% lower, to the last digit on every
    # run; seeds 1 and 2: 38% and 36%. The same run is 14% lower after 20 steps, 27% after 40, and
    # 5% lower at a tenth of the learning rate. At least 25% lower leaves room for another seed
    # and fails a loop whose updates do a fraction of what they should, where "lower at all"
    # passes on almost any step. The base is the tiny model's random weights (no pretrained base
    # model exists yet; a later issue adds one, and the margin should be measured again then), so
    # the drop is mostly a UNet learning to predict noise at all, not the concept.
    assert training["eval_loss"] <= 0.75 * training["eval_loss_start"], training
    assert last.eval_loss == training["eval_loss"]


def test_a_killed_worker_resumes_from_its_last_checkpoint_and_ends_with_the_weights_of_an_unkilled_run(
        cluster, concepts_file):
    import json

    from atelier.catalogue.schema import ConceptsFile

    name = ConceptsFile.load(concepts_file).concepts[3].name
    cfg = TrainConfig(max_train_steps=300, checkpoint_every=100, learning_rate=1e-5,
                      validation_steps=2, max_failures=1, model_name="killed")
    jobs = Jobs(cluster)
    # The same seed and config, left alone and alongside: the weights the killed run must end with.
    unkilled_id, _ = submit(cluster, concepts_file, cfg.model_copy(update={"model_name": "unkilled"}),
                            concepts=[name])
    job_id, spec = submit(cluster, concepts_file, cfg, concepts=[name])
    first = wait_for_durable_checkpoint(cluster, spec.run_name)
    before = progress(jobs, job_id)
    assert before.step is not None and before.step < cfg.max_train_steps, "finished before the kill"
    pids = {int(m) for m in WORKER_PID.findall(jobs.logs(job_id))}
    assert pids, "no Ray Train worker seen in the logs"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # a real worker process dies mid-run
    assert wait(jobs, job_id) == "SUCCEEDED"
    assert wait(jobs, unkilled_id) == "SUCCEEDED"
    p = progress(jobs, job_id)
    # A new worker resumed from a durable checkpoint before the end and trained the rest again.
    assert p.resumed_from is not None and first <= p.resumed_from < cfg.max_train_steps
    assert p.step == cfg.max_train_steps and p.published == [f"killed-{name}:1"]
    assert not job_events(jobs, unkilled_id, events.Resumed), "the unkilled run restarted too"

    storage = Storage(cluster)
    registry = Registry(storage)
    final = {}
    for model in ("killed", "unkilled"):
        _, card = registry.get(f"{model}-{name}")
        *_, previous, last = checkpoints(storage, card.run)
        training = json.loads((storage.fetch_cached(last) / "training.json").read_text())
        assert training["step"] == training["steps_recorded"] == cfg.max_train_steps, model
        final[model] = exported(storage, last)
        # Equal final weights would prove nothing if the last steps left them as they were.
        assert differing(final[model], exported(storage, previous)), f"{model}: the last steps changed nothing"
    # Exactly equal, not close: a resume that restores less than the whole training state (the
    # weights, the optimizer's moments and step count) or draws other batches or noise diverges.
    diff = differing(final["killed"], final["unkilled"])
    assert not diff, (f"the resumed run diverged from the unkilled one: {len(diff)} of {len(final['killed'])} "
                      f"tensors differ, by up to {max(diff.values()):.3g}")


def test_resubmitting_a_stopped_run_resumes_it(cluster, concepts_file):
    from atelier.catalogue.schema import ConceptsFile

    name = ConceptsFile.load(concepts_file).concepts[4].name
    cfg = TrainConfig(max_train_steps=600, checkpoint_every=100, learning_rate=1e-5, model_name="again")
    jobs = Jobs(cluster)
    job_id, _ = submit(cluster, concepts_file, cfg, concepts=[name], run_name="again-run")
    first = wait_for_durable_checkpoint(cluster, "again-run")
    jobs.stop(job_id)
    assert jobs.wait(job_id, timeout_s=120) == "STOPPED"
    job_id, _ = submit(cluster, concepts_file, cfg, concepts=[name], run_name="again-run")
    assert wait(jobs, job_id) == "SUCCEEDED"
    p = progress(jobs, job_id)
    assert p.resumed_from is not None and p.resumed_from >= first
    assert p.published == [f"again-{name}:1"]


def test_lora_with_prior_preservation_and_textual_inversion_reuse_cached_class_images(cluster, concepts_file):
    from atelier.catalogue.schema import ConceptsFile
    from atelier.models.load import load_model, load_pipeline

    concepts = [c for c in ConceptsFile.load(concepts_file).concepts if c.class_name == "rings"][:2]
    jobs = Jobs(cluster)
    lora = TrainConfig(method="lora", concept_mode="joint", max_train_steps=10, checkpoint_every=10,
                       learning_rate=1e-3, with_prior_preservation=True, num_class_images=2,
                       class_image_steps=2, model_name="rings-lora")
    job_id, _ = submit(cluster, concepts_file, lora, concepts=[c.name for c in concepts])
    assert wait(jobs, job_id) == "SUCCEEDED"
    assert [e.cached for e in job_events(jobs, job_id, events.ClassImages)] == [False]
    assert job_events(jobs, job_id, events.SamplesCommitted)[-1].files == 2
    ti = lora.model_copy(update={"method": "textual_inversion", "concept_mode": "per_concept",
                                 "model_name": "rings-ti"})
    job_id, _ = submit(cluster, concepts_file, ti, concepts=[concepts[0].name])
    assert wait(jobs, job_id) == "SUCCEEDED"
    # same base, prompt, count, seed: reused
    assert [e.cached for e in job_events(jobs, job_id, events.ClassImages)] == [True]

    base = load_pipeline("tiny", settings=cluster)
    prompt = concepts[0].instance_prompt
    for ref in ("rings-lora", f"rings-ti-{concepts[0].name}"):
        model = load_model(ref, settings=cluster)
        assert not torch.equal(render(model, prompt), render(base, prompt)), ref


def test_a_mixed_precision_8bit_job_on_two_ddp_workers_trains_and_serves_in_bf16(cluster, concepts_file):
    """The GPU defaults (mixed precision, 8-bit AdamW, gradient checkpointing) through Ray Train
    with two workers, whose half-precision frozen weights DDP broadcasts over gloo."""
    from atelier.catalogue.schema import ConceptsFile
    from atelier.models.load import load_model, load_pipeline
    concept = ConceptsFile.load(concepts_file).concepts[7]
    cfg = TrainConfig(method="lora", train_text_encoder=True, lora_rank=128, mixed_precision="bf16",
                      use_8bit_adam=True, gradient_checkpointing=True, num_workers=2,
                      max_train_steps=10, checkpoint_every=5, learning_rate=1e-3, model_name="mixed")
    jobs = Jobs(cluster)
    job_id, _ = submit(cluster, concepts_file, cfg, concepts=[concept.name])
    assert wait(jobs, job_id) == "SUCCEEDED"
    assert not job_events(jobs, job_id, events.Resumed), "a worker failed and restarted"
    p = job_events(jobs, job_id, events.Precision)[0]
    assert p.computed_in == "bfloat16" and p.gradient_checkpointing is True
    assert p.weights["unet"] == events.ModuleDtypes(frozen=["bfloat16"], trained=["float32"])
    assert p.optimizer == "bitsandbytes.optim.adamw.AdamW8bit" and "uint8" in p.optimizer_state_bytes
    assert progress(jobs, job_id).published == [f"mixed-{concept.name}:1"]

    tuned = load_model(f"mixed-{concept.name}", settings=cluster, dtype=torch.bfloat16)
    base = load_pipeline("tiny", settings=cluster, dtype=torch.bfloat16)
    a, b = render(tuned, concept.instance_prompt), render(base, concept.instance_prompt)
    assert tuned.unet.dtype == torch.bfloat16
    assert torch.isfinite(a.float()).all() and not torch.equal(a, b)


def test_cli_submits_follows_and_lists_a_training_job(cluster, concepts_file, monkeypatch, capsys):
    from atelier.catalogue.schema import ConceptsFile
    from atelier.cli.main import main

    monkeypatch.setenv("ATELIER_HOME", str(cluster.home))
    monkeypatch.setenv("COLUMNS", "200")
    for field, value in cluster.stack.model_dump().items():
        if value is not None:
            monkeypatch.setenv(f"ATELIER_STACK__{field.upper()}", str(value))
    name = ConceptsFile.load(concepts_file).concepts[5].name
    config = concepts_file.parent / "train.yaml"
    config.write_text("max_train_steps: 10\ncheckpoint_every: 5\nlearning_rate: 1.0e-4\n")
    code = main(["train", "submit", str(concepts_file), "--config", str(config), "--concept", name,
                 "--model-name", "cli", "--follow"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"published cli-{name}:1" in out
    job_id = next(line for line in out.splitlines() if line.startswith("raysubmit_"))
    assert main(["train", "status", job_id]) == 0
    status = capsys.readouterr().out
    assert "SUCCEEDED" in status and "10/10" in status
    assert main(["train", "list"]) == 0
    assert job_id in capsys.readouterr().out.replace("\n", "")
    assert main(["train", "logs", job_id]) == 0
    assert '"event": "checkpoint"' in capsys.readouterr().out
    assert main(["models", "show", f"cli-{name}"]) == 0
    assert main(["train", "submit", str(concepts_file), "--lr", "-1"]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_a_job_that_fails_later_says_why_in_its_status(cluster, concepts_file, tiny_model):
    from atelier.catalogue.schema import ConceptsFile

    storage = Storage(cluster)
    base = storage.uri("base-models", "tampered")
    storage.commit(tiny_model, base, {"kind": "base-model"})
    name = ConceptsFile.load(concepts_file).concepts[6].name
    cfg = TrainConfig(base_model=base, max_train_steps=10, max_failures=0, model_name="broken")
    job_id, _ = submit(cluster, concepts_file, cfg, concepts=[name])
    # Accepted at submission; the weights are then damaged before any worker reads them.
    storage.write_bytes(base + "/unet/diffusion_pytorch_model.safetensors", b"not the weights")
    jobs = Jobs(cluster)
    assert jobs.wait(job_id, timeout_s=300) == "FAILED"
    p = progress(jobs, job_id)
    assert p.status == "FAILED" and "does not match the manifest" in p.message
    assert "unet/diffusion_pytorch_model.safetensors" in p.message


def test_a_job_larger_than_the_embedded_head_is_refused_before_anything_is_uploaded(cluster, concepts_file):
    from atelier.errors import InvalidInput

    storage = Storage(cluster)
    before = storage.list_dir(storage.uri("datasets"))
    with pytest.raises(InvalidInput, match="needs 3 CPUs .* has 2") as caught:
        submit(cluster, concepts_file, TrainConfig(num_workers=3))
    assert caught.value.where == "num_workers"
    assert storage.list_dir(storage.uri("datasets")) == before
    assert Jobs(cluster).cpus()[1] == 2
