"""Model references: one parser says what a reference names, and every consumer agrees on it."""

from __future__ import annotations

import json
import shutil

import pytest

from atelier.catalogue.schema import ConceptsFile
from atelier.errors import InvalidInput, NotFound
from atelier.models.load import native_resolution, resolve_model
from atelier.models.ref import Builtin, Folder, HubId, Registered, S3Prefix, parse_model_ref
from atelier.registry import Registry
from atelier.storage import Storage
from atelier.training.config import TrainConfig
from atelier.training.spec import ModelRun
from atelier.training.submit import check_base_model


def _resized_model(tiny_model, tmp_path, sample_size: int):
    """The tiny model with another native size (the UNet's sample_size sets it)."""
    folder = tmp_path / f"tiny-{sample_size}"
    shutil.copytree(tiny_model, folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "sample_size": sample_size}))
    return folder


def test_class_images_for_an_s3_base_are_rendered_at_the_size_training_runs_at(
        tiny_model, tmp_path, settings, concepts_file, monkeypatch):
    """The prior-preservation images of an s3:// base come out at the model's native size (here
    128 px, as the training loop reads it), not at the tiny model's 64 px."""
    from atelier_jobs import sample, train

    storage = Storage(settings)
    uri = storage.uri("base-models", "tiny-128")
    storage.commit(_resized_model(tiny_model, tmp_path, 16), uri, {"kind": "base-model"})
    concepts = ConceptsFile.load(concepts_file)
    concept = concepts.concepts[0]
    run = ModelRun(config=TrainConfig(base_model=uri, with_prior_preservation=True, num_class_images=2),
                   dataset_uri="s3://unused", concepts=[concept.name], identifiers=[concept.identifier],
                   validation_prompts=[], model_name="m", run_name="r")
    rendered = []
    monkeypatch.setattr(sample, "run", lambda request, workers: rendered.append(request))

    train.class_images(storage, run, concepts)

    assert [(r.width, r.height) for r in rendered] == [(128, 128)]


def test_each_kind_of_reference_parses_to_its_type(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hoops").mkdir()  # a folder named like a registry model: the folder wins
    (tmp_path / "hoops" / "model_index.json").write_text("{}")
    assert parse_model_ref("tiny") == Builtin("tiny")
    assert parse_model_ref(str(tiny_model)) == Folder(tiny_model.resolve())
    assert parse_model_ref("hoops") == Folder((tmp_path / "hoops").resolve())
    assert parse_model_ref("s3://bucket/models/x/1/") == S3Prefix("s3://bucket/models/x/1")
    assert parse_model_ref("stabilityai/stable-diffusion-2-1-base") == HubId(
        "stabilityai/stable-diffusion-2-1-base")
    assert parse_model_ref("rings") == Registered("rings")
    assert parse_model_ref("rings:3") == Registered("rings", 3)
    assert str(parse_model_ref("rings:3")) == "rings:3"


@pytest.mark.parametrize(("text", "error", "says"), [
    ("./missing", NotFound, "folder not found"),
    ("/no/such/model", NotFound, "folder not found"),
    ("s3://bucket-only", InvalidInput, "bucket and a prefix"),
    ("Not A Model", NotFound, "unknown model"),
    ("rings:0", NotFound, "unknown model"),
])
def test_references_that_name_nothing_are_refused(text, error, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=says):
        parse_model_ref(text)


def test_native_resolution_of_every_kind(tiny_model, tmp_path, settings):
    storage = Storage(settings)
    folder = _resized_model(tiny_model, tmp_path, 16)
    uri = storage.uri("base-models", "tiny-128")
    storage.commit(folder, uri, {"kind": "base-model"})
    registry = Registry(storage)
    fields = dict(base_model=uri, concepts=[], hyperparameters={}, dataset_sha256="0" * 64)
    registry.publish(folder, name="full128", method="full", **fields)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"never read")
    registry.publish(tmp_path / "lora", name="lora128", method="lora", **fields)

    assert native_resolution("tiny", settings=settings) == 64
    assert native_resolution(str(folder), settings=settings) == 128
    assert native_resolution(uri, settings=settings, storage=storage) == 128
    assert native_resolution("full128", settings=settings, storage=storage) == 128
    assert native_resolution("lora128:1", settings=settings, storage=storage) == 128  # its base's
    with pytest.raises(InvalidInput, match="adapter"):
        resolve_model("lora128", settings=settings, storage=storage)
    assert resolve_model("full128", settings=settings, storage=storage) == str(
        storage.fetch_cached(registry.get("full128")[0]))


def test_a_base_model_for_training_is_one_every_worker_can_reach(tiny_model, tmp_path, settings):
    storage = Storage(settings)
    registry = Registry(storage)
    fields = dict(base_model="tiny", concepts=[], hyperparameters={}, dataset_sha256="0" * 64)
    full_uri, _ = registry.publish(tiny_model, name="shopfull", method="full", **fields)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"never read")
    registry.publish(tmp_path / "lora", name="shoplora", method="lora", **fields)

    assert check_base_model(storage, "tiny") == "tiny"
    assert check_base_model(storage, "org/model") == "org/model"
    committed = check_base_model(storage, str(tiny_model))  # a folder goes to S3 first
    assert committed.startswith("s3://") and storage.has_manifest(committed)
    assert check_base_model(storage, committed) == committed
    assert check_base_model(storage, "shopfull") == full_uri  # pinned to the version
    with pytest.raises(InvalidInput, match="adapter"):
        check_base_model(storage, "shoplora")
    with pytest.raises(NotFound):
        check_base_model(storage, storage.uri("base-models", "never-committed"))
