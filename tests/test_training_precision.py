"""Every precision, optimizer and method of the training loop, through a checkpoint, a resume and
a replica serving the result — each cell asserting the dtypes it ran with, not only that it ran.

The loop runs in this process (`atelier_jobs.dreambooth.train` behind its `Worker` seam, which is
all it sees of Ray Train), on the tiny model at 64 px against the moto S3 server; the Ray job
around it is covered by the integration tier. On a machine with CUDA the same cells run on the GPU.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

METHODS = ["full", "lora", "textual_inversion"]
PRECISIONS = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STEPS, EVERY = 4, 2
# Rank 128 on the tiny model's 32-wide layers makes each LoRA matrix 4096 values: the smallest
# tensor bitsandbytes keeps 8-bit state for (its min_8bit_size), so the 8-bit cells can show it.
LORA_RANK = 128


def cells(device: str) -> list:
    """(method, precision, 8-bit AdamW, gradient checkpointing, train text encoder, attention)."""
    if device == "cpu":
        grid = [(m, p, adam8, gc, False, "sdpa") for m in METHODS for p in PRECISIONS
                for adam8 in (False, True) for gc in (False, True)]
        grid += [(m, p, True, True, True, "sdpa") for m in ("full", "lora") for p in PRECISIONS]
        return [pytest.param(*c, id="-".join(_id(c))) for c in grid]
    grid = [(m, p, True, True, te, attention) for m in METHODS for p in ("fp16", "bf16")
            for attention in ("sdpa", "xformers") for te in ((False, True) if m != "textual_inversion" else (False,))]
    return [pytest.param(*c, id="cuda-" + "-".join(_id(c)), marks=pytest.mark.gpu) for c in grid]


def _id(cell) -> list[str]:
    method, precision, adam8, gc, te, attention = cell
    return [method, precision, "adam8" if adam8 else "adamw", "gc" if gc else "nogc"] + \
        (["te"] if te else []) + ([attention] if attention != "sdpa" else [])


@pytest.fixture(scope="module")
def shop(tmp_path_factory, moto_server, concepts_file):
    """A bucket on the moto server holding the synthetic shop's dataset, and settings for it."""
    from atelier.catalogue.schema import ConceptsFile
    from atelier.storage import Storage
    from atelier.training.dataset import commit_dataset
    from support import bucket_settings

    settings = bucket_settings(moto_server, tmp_path_factory.mktemp("precision"))
    storage = Storage(settings)
    uri, digest, _ = commit_dataset(storage, concepts_file)
    concepts = ConceptsFile.load(storage.fetch_cached(uri) / "concepts.yaml")
    return SimpleNamespace(settings=settings, storage=storage, uri=uri, digest=digest,
                           concepts=concepts, concept=concepts.concepts[0])


@dataclass
class Kept:
    """Ray Train's side of `report`: each checkpoint copied to storage of its own."""

    root: Path

    def __post_init__(self):
        self.steps: dict[int, Path] = {}

    def __call__(self, metrics: dict, checkpoint=None) -> None:
        if checkpoint is not None:
            self.steps[metrics["step"]] = Path(checkpoint.to_directory(str(self.root / f"step-{metrics['step']}")))


def plan_run(shop, cfg):
    """The job spec and the one model run of `cfg` on the shop's first concept."""
    from atelier.training.spec import TrainJobSpec
    from atelier_jobs.train import plan

    spec = TrainJobSpec(config=cfg, dataset_uri=shop.uri, dataset_sha256=shop.digest,
                        run_name=cfg.model_name, concepts=[shop.concept.name])
    [run] = plan(spec, shop.concepts)
    return spec, run


def train(shop, run, device: str, root: Path, resume_from: Path | None = None) -> Kept:
    from atelier_jobs.dreambooth import Worker
    from atelier_jobs.dreambooth import train as train_loop

    kept = Kept(root)
    checkpoint = _checkpoint(resume_from) if resume_from else None
    train_loop(run, Worker(rank=0, world=1, device=torch.device(device), checkpoint=checkpoint,
                           report=kept, prepare_model=lambda m: m, storage=shop.storage))
    return kept


def exported(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the exported model in a checkpoint, keyed by file and name."""
    from safetensors.torch import load_file

    return {f"{path.relative_to(folder)}:{k}": v for path in sorted((folder / "model").rglob("*.safetensors"))
            for k, v in load_file(path).items()}


def optimizer_state_dtypes(folder: Path) -> set[torch.dtype]:
    """Dtypes of the optimizer state saved in a checkpoint (bitsandbytes nests its own)."""
    def tensors(value):
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)

    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)["optimizer"]["state"]
    return {t.dtype for t in tensors(state) if t.numel() > 1}


def image(pngs: list[bytes]) -> np.ndarray:
    [png] = pngs
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("method, precision, adam8, gc, text_encoder, attention",
                         cells("cpu") + cells("cuda"))
def test_each_precision_trains_checkpoints_resumes_exactly_and_serves(
        shop, tmp_path, request, method, precision, adam8, gc, text_encoder, attention):
    from atelier.training.config import TrainConfig
    from atelier_jobs.train import publish

    device = "cuda" if "cuda" in request.node.callspec.id else "cpu"
    if adam8:
        pytest.importorskip("bitsandbytes")
    if attention == "xformers":
        pytest.importorskip("xformers")
    name = f"p-{request.node.callspec.id}".replace("_", "-").lower()
    cfg = TrainConfig(method=method, mixed_precision=precision, use_8bit_adam=adam8,
                      gradient_checkpointing=gc, train_text_encoder=text_encoder,
                      attention=attention, max_train_steps=STEPS, checkpoint_every=EVERY,
                      learning_rate=1e-3, lora_rank=LORA_RANK, validation_steps=2,
                      use_gpu=device == "cuda", model_name=name)
    spec, run = plan_run(shop, cfg)
    dtype = PRECISIONS[precision]
    half = str(dtype).removeprefix("torch.")

    # -- uninterrupted: a checkpoint every 2 steps ----------------------------------------------
    straight = train(shop, run, device, tmp_path / "straight")
    assert sorted(straight.steps) == [EVERY, STEPS]
    final = straight.steps[STEPS]
    training = json.loads((final / "training.json").read_text())
    p = training["precision"]
    assert p["computed_in"] == half  # the dtype the UNet's output came out in: autocast is on
    assert p["loss_scaling"] is (precision == "fp16")
    assert p["gradient_checkpointing"] is gc
    assert p["attention"] == (["XFormersAttnProcessor"] if attention == "xformers" else ["AttnProcessor2_0"])
    # Frozen weights in the compute dtype, trained weights in float32 (the master weights).
    trains = {"unet": method != "textual_inversion",
              "text_encoder": text_encoder or method == "textual_inversion", "vae": False}
    for module, w in p["weights"].items():
        assert w["trained"] == (["float32"] if trains[module] else []), (module, w)
    assert p["weights"]["vae"]["frozen"] == [half]
    if method != "full":
        assert p["weights"]["unet"]["frozen"] == [half]
    if method == "lora" or not trains["text_encoder"]:
        assert p["weights"]["text_encoder"]["frozen"] == [half]
    # The optimizer is the one asked for, and its saved state is really 8-bit.
    assert p["optimizer"] == ("bitsandbytes.optim.adamw.AdamW8bit" if adam8 else "torch.optim.adamw.AdamW")
    assert ("uint8" in p["optimizer_state_bytes"]) is adam8
    assert (torch.uint8 in optimizer_state_dtypes(final)) is adam8
    # What a replica loads is float32, finite, and was trained.
    weights = exported(final)
    assert weights and {t.dtype for t in weights.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not _equal(weights, exported(straight.steps[EVERY])), "steps 3-4 changed nothing"
    assert len(list((final / "validation").glob("*.png"))) == 1

    # -- killed after the first checkpoint: a resume reproduces the uninterrupted run exactly -----
    resumed = train(shop, run, device, tmp_path / "resumed", resume_from=straight.steps[EVERY])
    assert sorted(resumed.steps) == [STEPS]
    again = json.loads((resumed.steps[STEPS] / "training.json").read_text())
    assert again["steps_recorded"] == STEPS and again["precision"] == p
    assert _equal(exported(resumed.steps[STEPS]), weights), "the resumed run diverged"

    # -- published and served: by a replica in the training's dtype, and a float32-trained model
    #    also on half-precision bases --------------------------------------------------------------
    _, card = publish(shop.storage, run, spec, shop.concepts, SimpleNamespace(checkpoint=_checkpoint(final)))
    serve_in = [dtype] if precision != "no" else list(PRECISIONS.values())
    if device == "cpu" and (adam8 or gc):
        serve_in = serve_in[:1]  # the optimizer and checkpointing change no served layer: spare the time
    for serving in serve_in:
        tuned, base = _serve(shop, device, serving, card.ref, shop.concept.instance_prompt)
        assert tuned.std() > 0 and not np.array_equal(tuned, base), f"served in {serving}"


def _serve(shop, device: str, dtype, model: str, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """One image of `model` and one of its base, same seed, from a replica's model cache."""
    from atelier_serve.pipelines import Job, ModelCache

    cache = ModelCache(shop.settings, base_models={"tiny": "tiny"}, device=device, dtype=dtype)
    out = []
    for ref in (model, "tiny"):
        loaded = cache.load(ref)
        assert loaded.pipe.unet.dtype == dtype and loaded.pipe.vae.dtype == dtype
        job = Job(loaded=loaded, prompt=prompt, negative_prompt=None, n=1, seed=0, steps=3,
                  guidance_scale=7.5, width=64, height=64, scheduler="ddim")
        [pngs] = cache.run([job])
        out.append(image(pngs))
    return out[0], out[1]


def _checkpoint(folder: Path):
    import ray.train

    return ray.train.Checkpoint.from_directory(str(folder))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_fp16_resume_restores_the_loss_scale(shop, tmp_path, monkeypatch):
    """fp16 steps that overflow are skipped and the loss scale backs off; a resume must carry
    the scale on, or it skips steps the uninterrupted run took. The tiny model never overflows
    at the default scale, so this scaler starts at 2^24 and backs off to 2^14 in one step."""
    from atelier.training.config import TrainConfig

    class Overflowing(torch.amp.GradScaler):
        def __init__(self, device, enabled=True):
            super().__init__(device, init_scale=2.0 ** 24, backoff_factor=2.0 ** -10, enabled=enabled)

    monkeypatch.setattr(torch.amp, "GradScaler", Overflowing)
    cfg = TrainConfig(mixed_precision="fp16", max_train_steps=STEPS, checkpoint_every=EVERY,
                      learning_rate=1e-3, validation_steps=1, model_name="scale")
    _, run = plan_run(shop, cfg)
    straight = train(shop, run, "cpu", tmp_path / "straight")
    scales = [json.loads((straight.steps[s] / "training.json").read_text())["loss_scale"] for s in (EVERY, STEPS)]
    assert scales == [2.0 ** 14, 2.0 ** 14], "the first step should have overflowed, and only it"
    resumed = train(shop, run, "cpu", tmp_path / "resumed", resume_from=straight.steps[EVERY])
    assert _equal(exported(resumed.steps[STEPS]), exported(straight.steps[STEPS]))


def test_the_loop_writes_events_its_log_readers_parse(shop, tmp_path, capsys):
    """Each event the training loop writes is read back, typed, by `events.parse` (what the CLI,
    the demo and the tests read a job's log with), and says what the checkpoint says."""
    from atelier.training import events
    from atelier.training.config import TrainConfig

    cfg = TrainConfig(method="lora", mixed_precision="no", max_train_steps=2, checkpoint_every=1,
                      learning_rate=1e-3, validation_steps=1, model_name="events")
    _, run = plan_run(shop, cfg)
    capsys.readouterr()
    straight = train(shop, run, "cpu", tmp_path / "straight")
    written = [e for e in map(events.parse, capsys.readouterr().out.splitlines()) if e]
    assert [type(e) for e in written] == [events.Start, events.Precision, events.Checkpoint,
                                          events.Step, events.Checkpoint]
    start, precision, first, step, last = written
    assert (start.model, start.step, start.total, start.workers) == (run.model_name, 0, 2, 1)
    assert (first.step, step.step, last.step) == (1, 2, 2)
    training = json.loads((straight.steps[2] / "training.json").read_text())
    assert precision.model_dump(exclude={"event", "model"}) == training["precision"]
    assert last.eval_loss == training["eval_loss"]

    train(shop, run, "cpu", tmp_path / "resumed", resume_from=straight.steps[1])
    written = [e for e in map(events.parse, capsys.readouterr().out.splitlines()) if e]
    assert [type(e) for e in written][:2] == [events.Resumed, events.Start]
    assert written[0].step == written[1].step == 1


@pytest.fixture(scope="module")
def lora_checkpoint(shop, tmp_path_factory):
    """A LoRA run and its checkpoint at its last step, for tests that resume from it."""
    from atelier.training.config import TrainConfig

    cfg = TrainConfig(method="lora", lora_rank=4, mixed_precision="no", max_train_steps=2,
                      checkpoint_every=2, learning_rate=1e-3, validation_steps=1, model_name="strict")
    _, run = plan_run(shop, cfg)
    return run, train(shop, run, "cpu", tmp_path_factory.mktemp("strict")).steps[2]


@pytest.mark.parametrize("tamper, rank, refusal", [
    (lambda state: None, 4, None),  # the rewrite alone: the checkpoint still resumes
    (lambda state: state["unet"].pop(sorted(state["unet"])[0]), 4,
     r"does not fit the unet this run trains: missing .*lora"),
    (lambda state: state["text_encoder"].update({"text_model.extra.weight": torch.zeros(2)}), 4,
     r"does not fit the text_encoder this run trains: unexpected text_model.extra.weight"),
    (lambda state: None, 8, r"does not fit the unet this run trains: other shape .*lora"),
    (lambda state: state.pop("scaler"), 4, r"training state has keys \[.*\], expected"),
    (lambda state: state.update(losses=[Fraction(1, 3)]), 4, "more than tensors and plain values"),
], ids=["untouched", "missing-key", "unexpected-key", "other-lora-rank", "no-scaler", "pickled-object"])
def test_a_checkpoint_that_does_not_fit_the_run_is_refused_not_loaded_in_part(
        shop, lora_checkpoint, tmp_path, tamper, rank, refusal):
    import shutil

    from atelier.errors import InvalidInput
    from atelier.storage import verify_local, write_local_manifest

    run, original = lora_checkpoint
    folder = tmp_path / "checkpoint"
    shutil.copytree(original, folder)
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    tamper(state)
    torch.save(state, folder / "state.pt")
    write_local_manifest(folder, verify_local(original).metadata)  # the hashes match again
    run = run.model_copy(update={"config": run.config.model_copy(update={"lora_rank": rank})})
    if refusal is None:
        train(shop, run, "cpu", tmp_path / "resumed", resume_from=folder)
        return
    with pytest.raises(InvalidInput, match=refusal) as refused:
        train(shop, run, "cpu", tmp_path / "resumed", resume_from=folder)
    assert refused.value.where.endswith("state.pt")
