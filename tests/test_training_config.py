"""Training config and submission: every bad input is refused before any compute is spent."""

from __future__ import annotations

import json

import pytest
import yaml

from atelier.errors import InvalidInput, NotFound, ServiceError, StorageUnavailable
from atelier.settings import S3Settings, Settings
from atelier.storage import Storage
from atelier.training.config import TrainConfig
from atelier.training.submit import prepare, submit


@pytest.fixture(scope="module")
def concepts_file(tmp_path_factory):
    from atelier.catalogue.build import build_concepts
    from atelier.catalogue.synth import synth_shop
    from atelier.models.tokenizer import build_clip_tokenizer

    tmp = tmp_path_factory.mktemp("shop")
    build_concepts(synth_shop(tmp / "shop"), tmp / "concepts.yaml", build_clip_tokenizer())
    return tmp / "concepts.yaml"


def test_defaults_are_the_studys_best():
    cfg = TrainConfig()
    assert (cfg.learning_rate, cfg.max_train_steps) == (1e-6, 200)
    assert cfg.with_prior_preservation is False and cfg.use_identifier is True
    assert cfg.method == "full"


@pytest.mark.parametrize("flags, message", [
    ({"learning_rate": 0}, "learning_rate"),
    ({"learning_rate": -1e-4}, "learning_rate"),
    ({"max_train_steps": 0}, "max_train_steps"),
    ({"resolution": 100}, "100 is not a multiple of 8"),
    ({"method": "dreamy"}, "method"),
    ({"method": "textual_inversion", "train_text_encoder": True}, "only the identifier"),
])
def test_bad_hyperparameters_are_refused_with_the_field(flags, message):
    with pytest.raises(InvalidInput, match=message):
        TrainConfig.load(None, **flags)


def test_yaml_file_unknown_key_is_named(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"learning_rate": 1e-5, "lerning_rate": 1}))
    with pytest.raises(InvalidInput, match=r"train.yaml: lerning_rate: unknown key"):
        TrainConfig.load(path)


def test_flags_override_the_yaml_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"learning_rate": 1e-5, "max_train_steps": 50}))
    cfg = TrainConfig.load(path, max_train_steps=10, method=None)
    assert (cfg.learning_rate, cfg.max_train_steps) == (1e-5, 10)


def test_job_argument_round_trips_through_json():
    cfg = TrainConfig(method="lora", lora_rank=8, validation_prompts=["a"])
    assert TrainConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_missing_concepts_file_is_refused(settings, tmp_path):
    with pytest.raises(NotFound, match="concepts file not found"):
        prepare(settings, tmp_path / "nope.yaml", TrainConfig())


def test_empty_concepts_are_refused(settings, tmp_path):
    path = tmp_path / "concepts.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "tokenizer": "tiny", "source": "x", "concepts": []}))
    with pytest.raises(InvalidInput, match="concepts"):
        prepare(settings, path, TrainConfig())


def test_unknown_concept_name_is_refused(settings, concepts_file):
    with pytest.raises(InvalidInput, match="no such concept: nope"):
        prepare(settings, concepts_file, TrainConfig(), concepts=["nope"])


def test_unknown_base_model_is_refused(settings, concepts_file):
    with pytest.raises(NotFound, match="base_model: unknown model"):
        prepare(settings, concepts_file, TrainConfig(base_model="no such model"))
    with pytest.raises(NotFound, match="no manifest"):
        prepare(settings, concepts_file, TrainConfig(base_model=Storage(settings).uri("missing")))


def test_unreachable_storage_is_refused(concepts_file, tmp_path):
    creds = tmp_path / "creds"
    creds.write_text("[default]\naws_access_key_id = a\naws_secret_access_key = b\n")
    s = Settings(home=tmp_path, s3=S3Settings(endpoint="http://127.0.0.1:9", credentials_file=creds))
    with pytest.raises(StorageUnavailable, match="cannot reach"):
        prepare(s, concepts_file, TrainConfig())


def test_unreachable_ray_is_refused_before_anything_is_uploaded(settings, concepts_file):
    s = settings.model_copy(update={"ray_address": "http://127.0.0.1:9"})
    with pytest.raises(ServiceError, match="Ray"):
        submit(s, concepts_file, TrainConfig())
    assert Storage(settings).list_dir(Storage(settings).uri("datasets")) == []


def test_dataset_is_committed_once_and_named_by_its_content(settings, concepts_file):
    first = prepare(settings, concepts_file, TrainConfig(), run_name="r1")
    second = prepare(settings, concepts_file, TrainConfig(), run_name="r2")
    assert first.dataset_uri == second.dataset_uri
    storage = Storage(settings)
    manifest = storage.read_manifest(first.dataset_uri)
    assert manifest.metadata["sha256"] == first.dataset_sha256
    assert sum(f.path.startswith("images/") for f in manifest.files) >= 19 * 3
    assert first.config.model_name == "concepts"
    spec = json.loads(first.model_dump_json())
    assert spec["config"]["learning_rate"] == 1e-6
