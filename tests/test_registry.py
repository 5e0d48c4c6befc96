"""The model registry on a moto S3: versions, visibility of partial uploads, names, removal, loading
every kind of model by name, and the `atelier models` commands."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import yaml

import atelier
from atelier.errors import Conflict, InvalidInput, NotFound
from atelier.models import adapters, load_pipeline
from atelier.models.load import load_model
from atelier.models.ref import Registered, parse_registered, validate_name
from atelier.registry import ModelCard, Registry, code_version
from atelier.storage import Storage
from support import CONCEPT, an_evaluation, card_fields
from test_adapters import TOKEN, image, lora_pipeline, ti_pipeline


@pytest.fixture
def registry(settings):
    return Registry(Storage(settings))


@pytest.fixture
def full_dir(tmp_path):
    """Stands in for a diffusers folder where only the registry, not loading, is under test."""
    folder = tmp_path / "full"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}\n')
    return folder


def test_versions_allocate_one_two_three(registry, full_dir):
    published = [registry.publish(full_dir, name="hoops", **card_fields()) for _ in range(3)]
    assert [card.version for _, card in published] == [1, 2, 3]
    assert [uri for uri, _ in published] == [registry.uri("hoops", v) for v in (1, 2, 3)]
    assert [c.version for c in registry.list("hoops")] == [1, 2, 3]
    assert registry.get("hoops") == published[2]
    assert registry.get("hoops:2") == published[1]
    card = published[0][1]
    assert card.code_version == code_version() and card.code_version.startswith(atelier.__version__)
    assert card.concepts == [CONCEPT] and card.final_loss == 0.125 and card.token is None


def test_a_version_taken_meanwhile_is_skipped_not_overwritten(registry, full_dir, monkeypatch):
    first_uri, first = registry.publish(full_dir, name="hoops", **card_fields())
    # As if another publisher committed version 1 between our listing and our commit.
    monkeypatch.setattr(registry, "_last_allocated", lambda name: 0)
    _, second = registry.publish(full_dir, name="hoops", **card_fields(final_loss=0.5))
    assert second.version == 2
    assert registry.get("hoops:1") == (first_uri, first)


def test_a_publish_whose_answers_an_outage_hid_goes_on_under_the_number_it_claimed(registry, full_dir,
                                                                                   monkeypatch):
    """As if S3 went away just after writing the claim, and again just after the manifest: each
    write landed, its answer was lost. Waiting out outages, the publication knows its own claim
    and its own manifest again, and ends as version 1 with no other number taken."""
    from atelier.errors import StorageUnavailable
    from atelier.registry import CLAIM
    from atelier.storage import MANIFEST, UNREACHABLE, Outages

    storage = registry.storage
    create = storage.create
    lose = {CLAIM: 1, MANIFEST: 1}  # answers to lose, by the name of the object written

    def create_then_lose_answer(uri: str, data: bytes) -> bool:
        created = create(uri, data)
        if lose.get(name := uri.rsplit("/", 1)[-1]):
            lose[name] -= 1
            raise StorageUnavailable(UNREACHABLE, where=uri)
        return created

    monkeypatch.setattr(storage, "create", create_then_lose_answer)
    outages = Outages(storage, wait_s=5)
    uri, card = registry.publish(full_dir, name="hoops", **card_fields(), outages=outages)
    assert (card.ref, outages.count, lose) == ("hoops:1", 2, {CLAIM: 0, MANIFEST: 0})
    assert [c.ref for c in registry.list("hoops")] == ["hoops:1"] and registry._last_allocated("hoops") == 1
    assert registry.get("hoops:1") == (uri, card)
    # Another's claim or commit at a number is still never taken for this one's.
    lose[CLAIM] = 1
    with pytest.raises(StorageUnavailable):
        registry.publish(full_dir, name="hoops", **card_fields())  # without outages: raised
    _, other = registry.publish(full_dir, name="hoops", **card_fields(), outages=Outages(storage, wait_s=5))
    assert other.version == 3


def test_partial_uploads_are_invisible_and_their_numbers_not_reused(registry, full_dir):
    storage = registry.storage
    storage.write_bytes(registry.uri("rings", 1) + "/unet/weights.safetensors", b"half an upload")
    assert registry.list() == []
    with pytest.raises(NotFound, match="no model named 'rings'"):
        registry.get("rings")
    with pytest.raises(NotFound, match="has no version 1"):
        registry.get("rings:1")
    # The upload may still be in flight: the next publish takes 2, not 1.
    _, card = registry.publish(full_dir, name="rings", **card_fields())
    assert card.version == 2
    assert [(c.name, c.version) for c in registry.list()] == [("rings", 2)]
    assert registry.get("rings")[1] == card
    # Committed prefixes outside <name>/<version> are not models.
    storage.commit(full_dir, storage.uri("models", "rings", "extra", "deeper"))
    assert [c.ref for c in registry.list()] == ["rings:2"]


class NoStorage:
    """Fails the test on any storage call: names are checked before anything is read."""

    def __getattr__(self, name):
        raise AssertionError(f"storage.{name} was called")


@pytest.mark.parametrize("ref", [
    "../x", "a/b", "/abs", "..", "a..b", "Hoops", "", "-a", ".a", "x" * 64, "a b", "a\\b",
    "a:0", "a:-1", "a:1.5", "a:b", "a:", "a:1:2", "a:01", "a@", "a@Prod", "a@1x", "a@p/q", "a@p:1",
    "a@" + "p" * 33,
])
def test_names_that_could_leave_the_registry_prefix_are_rejected(ref, full_dir):
    registry = Registry(NoStorage())
    with pytest.raises(InvalidInput):
        parse_registered(ref)
    with pytest.raises(InvalidInput):
        registry.get(ref)
    with pytest.raises(InvalidInput):
        registry.rm(ref, all_versions=True)
    name = ref.split(":")[0].split("@")[0]
    if ":" not in ref and "@" not in ref:
        with pytest.raises(InvalidInput):
            registry.publish(full_dir, name=name, **card_fields())
        with pytest.raises(InvalidInput):
            registry.list(name)


def test_good_names_and_references_parse():
    assert validate_name("a") == "a"
    assert validate_name("beaded-hoops_v2.1") == "beaded-hoops_v2.1"
    assert validate_name("x" * 63)
    assert parse_registered("hoops") == Registered("hoops", None)
    assert parse_registered("hoops:12") == Registered("hoops", 12)
    assert parse_registered("hoops@prod") == Registered("hoops", alias="prod")
    assert str(Registered("hoops", alias="canary-2")) == "hoops@canary-2"


def test_bad_cards_and_folders_are_refused_before_uploading(registry, full_dir, tmp_path):
    with pytest.raises(InvalidInput, match="built-in"):
        registry.publish(full_dir, name="tiny", **card_fields())
    with pytest.raises(InvalidInput, match="method"):
        registry.publish(full_dir, name="m", **card_fields(method="dreambooth"))
    with pytest.raises(InvalidInput, match="pytorch_lora_weights"):
        registry.publish(full_dir, name="m", **card_fields(method="lora"))
    with pytest.raises(NotFound, match="textual-inversion"):
        registry.publish(full_dir, name="m", **card_fields(method="textual_inversion"))
    with pytest.raises(InvalidInput, match="model_index.json"):
        registry.publish(tmp_path, name="m", **card_fields())
    with pytest.raises(InvalidInput, match="concepts"):
        registry.publish(full_dir, name="m", **card_fields(concepts=[{"name": "x"}]))
    assert registry.storage.list_dir(registry.uri("m")) == []


def test_concepts_are_taken_from_catalogue_objects(registry, full_dir):
    concept = SimpleNamespace(**CONCEPT.model_dump(), class_name="hoops", style="beaded", images=[])
    _, card = registry.publish(full_dir, name="hoops", **card_fields(concepts=[concept]))
    assert card.concepts == [CONCEPT]
    stored = registry.storage.read_manifest(registry.uri("hoops", 1)).metadata
    assert ModelCard.model_validate(stored) == card


def test_rm_removes_one_version_or_all_when_asked(registry, full_dir):
    for _ in range(2):
        registry.publish(full_dir, name="hoops", **card_fields())
    with pytest.raises(InvalidInput, match="all-versions"):
        registry.rm("hoops")
    assert registry.rm("hoops:1", dry_run=True) == [registry.uri("hoops", 1)]
    assert registry.get("hoops:1")
    assert registry.rm("hoops:1") == [registry.uri("hoops", 1)]
    with pytest.raises(NotFound, match="has no version 1"):
        registry.get("hoops:1")
    with pytest.raises(NotFound):
        registry.rm("hoops:1")
    registry.publish(full_dir, name="hoops", **card_fields())
    assert [c.version for c in registry.list("hoops")] == [2, 3]
    assert registry.rm("hoops", all_versions=True) == [registry.uri("hoops", v) for v in (3, 2)]
    assert registry.list() == []
    with pytest.raises(NotFound, match="no model named 'hoops'"):
        registry.rm("hoops", all_versions=True)
    # Removed numbers stay taken: "hoops:3" never comes to mean another model.
    assert registry.publish(full_dir, name="hoops", **card_fields())[1].version == 4


def test_load_model_loads_every_method_by_name_and_version(settings, tiny_model, tmp_path):
    storage = Storage(settings)
    registry = Registry(storage)
    prompt = f"photo of a {TOKEN} ring"
    base = load_pipeline(str(tiny_model))
    base_image, base_ti_image = image(base), image(base, prompt)

    registry.publish(tiny_model, name="tiny-copy", **card_fields())
    trained_lora = lora_pipeline(tiny_model)
    adapters.save_lora(trained_lora.unet, tmp_path / "lora", text_encoder=trained_lora.text_encoder)
    # The LoRA's base is itself a registry model: loading goes through the registry twice.
    registry.publish(tmp_path / "lora", name="ring-lora", **card_fields(method="lora", base_model="tiny-copy"))
    trained_ti = ti_pipeline(tiny_model)
    adapters.save_textual_inversion(trained_ti.text_encoder, trained_ti.tokenizer, TOKEN, tmp_path / "ti")
    _, ti_card = registry.publish(tmp_path / "ti", name="ring-ti",
                                  **card_fields(method="textual_inversion", base_model=str(tiny_model)))
    assert ti_card.token == TOKEN  # read from the weights

    for ref in ("tiny-copy", "tiny-copy:1"):
        assert np.array_equal(image(load_model(ref, settings=settings, storage=storage)), base_image)
    lora_image = image(trained_lora)
    for ref in ("ring-lora", "ring-lora:1"):
        loaded = image(load_model(ref, settings=settings, storage=storage))
        assert np.array_equal(loaded, lora_image) and not np.array_equal(loaded, base_image)
    ti_image = image(trained_ti, prompt)
    for ref in ("ring-ti", "ring-ti:1"):
        loaded = image(load_model(ref, settings=settings, storage=storage), prompt)
        assert np.array_equal(loaded, ti_image) and not np.array_equal(loaded, base_ti_image)

    # Everything else still means what load_pipeline makes of it.
    assert np.array_equal(image(load_model(str(tiny_model), settings=settings)), base_image)
    with pytest.raises(NotFound, match="has no version 7"):
        load_model("ring-lora:7", settings=settings, storage=storage)
    with pytest.raises(NotFound, match="unknown model"):
        load_model("Not A Model", settings=settings, storage=storage)


def test_a_model_that_is_its_own_base_is_refused(settings, tmp_path):
    registry = Registry(Storage(settings))
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / adapters.LORA_WEIGHTS).write_bytes(b"never read")
    registry.publish(tmp_path / "lora", name="loop", **card_fields(method="lora", base_model="loop"))
    with pytest.raises(InvalidInput, match="its own base"):
        load_model("loop", settings=settings)


# -- the CLI -----------------------------------------------------------------------------------------
def test_cli_lists_shows_and_removes_models(models_cli, registry, full_dir):
    assert models_cli("list")[:2] == (0, "no models registered\n")
    registry.publish(full_dir, name="hoops", **card_fields())
    _, card = registry.publish(full_dir, name="hoops", **card_fields(final_loss=None))

    code, out, _ = models_cli("list")
    assert code == 0
    assert "hoops" in out and "full" in out and "sks" in out and "0.125" in out

    code, out, _ = models_cli("show", "hoops")
    assert code == 0
    assert out.startswith(f"# {registry.uri('hoops', 2)}\n")
    shown = yaml.safe_load(out)
    assert shown.pop("evaluation") is None  # never evaluated
    assert shown.pop("aliases") == []  # never promoted
    assert ModelCard.model_validate(shown) == card

    code, out, _ = models_cli("rm", "hoops:1", "--yes")
    assert (code, out) == (0, f"removed {registry.uri('hoops', 1)}\n")
    assert [c.version for c in registry.list()] == [2]


def test_cli_maps_errors_to_exit_codes(models_cli, registry, full_dir):
    registry.publish(full_dir, name="hoops", **card_fields())
    code, _, err = models_cli("show", "hoops:9")
    assert code == 3 and "has no version 9" in err
    assert models_cli("show", "rings")[0] == 3
    code, _, err = models_cli("show", "../etc")
    assert code == 2 and "invalid model name" in err
    code, _, err = models_cli("rm", "hoops", "--yes")
    assert code == 2 and "--all-versions" in err
    assert models_cli("rm", "hoops:1", answer="n")[0] == 130  # declined: nothing is removed
    assert [c.version for c in registry.list()] == [1]
    assert models_cli("rm", "hoops", "--all-versions", "--yes")[0] == 0
    assert registry.list() == []


def test_an_evaluation_is_kept_beside_its_version_and_shown_by_list_and_show(models_cli, registry, full_dir,
                                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # every column's header whole, as on a wide terminal
    _, first = registry.publish(full_dir, name="hoops", **card_fields())
    _, second = registry.publish(full_dir, name="hoops", **card_fields())
    assert registry.evaluation(first) is None
    grids = tmp_path / "eval"
    (grids / "grids").mkdir(parents=True)
    (grids / "grids" / "beaded-hoops.png").write_bytes(b"png")
    registry.record_evaluation(grids, an_evaluation("hoops:1", 0.8125))
    assert registry.evaluation(first).summary()["clip_i"] == 0.8125
    assert registry.evaluation(second) is None  # another version's, not this one's

    code, out, _ = models_cli("list")
    assert code == 0
    assert "clip_i" in out and "0.8125" in out and "12.5" in out
    hoops1 = next(line for line in out.splitlines() if "hoops" in line and "│ 1 " in line)
    assert "0.8125" in hoops1

    code, out, _ = models_cli("show", "hoops:1")
    shown = yaml.safe_load(out)["evaluation"]
    assert shown["summary"]["clip_i"] == 0.8125 and shown["base_summary"]["clip_i"] == 0.5
    assert shown["unavailable"] == {"dino": "no DINO encoder configured"}
    assert shown["concepts"][0]["grid"] == "grids/beaded-hoops.png"

    # A newer evaluation replaces the older one.
    registry.record_evaluation(grids, an_evaluation("hoops:1", 0.9))
    assert registry.evaluation(first).summary()["clip_i"] == 0.9


def test_an_evaluation_of_an_unknown_model_is_refused(registry, tmp_path):
    with pytest.raises(NotFound):
        registry.record_evaluation(tmp_path, an_evaluation("rings:3", 0.5))


def test_upload_commits_a_folder_that_loads_from_s3_verified(models_cli, registry, tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    uri = registry.storage.uri("encoders", "clip")
    code, out, _ = models_cli("upload", str(folder), "--to", uri)
    assert code == 0 and f"committed {folder} to {uri} (2 files" in " ".join(out.split())
    fetched = registry.storage.fetch_cached(uri)
    assert (fetched / "model.safetensors").read_bytes() == b"weights"
    assert models_cli("upload", str(folder), "--to", str(tmp_path / "x"))[0] == 2
    assert models_cli("upload", str(tmp_path / "nope"), "--to", uri)[0] == 3


def test_an_alias_names_the_version_promoted_last_and_keeps_its_history(registry, full_dir):
    for _ in range(3):
        registry.publish(full_dir, name="hoops", **card_fields())
    with pytest.raises(NotFound, match="no alias 'prod'") as e:
        registry.get("hoops@prod")
    assert "atelier models promote hoops:VERSION --alias prod" in str(e.value)

    first = registry.promote("hoops:1", "prod", note="first")
    assert (first.seq, first.version, first.previous, first.action) == (1, 1, None, "promote")
    assert registry.get("hoops@prod") == registry.get("hoops:1")
    registry.promote("hoops", "prod")  # the latest: 3
    registry.promote("hoops:2", "canary")
    registry.promote("hoops@canary", "prod")  # an alias names a version too
    assert registry.get("hoops@prod")[1].version == 2

    back = registry.rollback("hoops", "prod")
    assert (back.version, back.previous, back.action) == (3, 2, "rollback")
    assert registry.get("hoops@prod")[1].version == 3
    assert {a: m.version for a, m in registry.aliases("hoops").items()} == {"canary": 2, "prod": 3}
    assert [(m.alias, m.seq, m.version) for m in registry.history("hoops", "prod")] == [
        ("prod", 1, 1), ("prod", 2, 3), ("prod", 3, 2), ("prod", 4, 3)]
    assert len(registry.history("hoops")) == 5 and registry.history("hoops", "prod")[0].note == "first"

    with pytest.raises(InvalidInput, match="no earlier version"):
        registry.rollback("hoops", "canary")
    with pytest.raises(NotFound, match="no version 9"):
        registry.promote("hoops:9", "prod")
    # A version an alias serves cannot be removed from under it; another can.
    with pytest.raises(InvalidInput, match="hoops@prod"):
        registry.rm("hoops:3")
    with pytest.raises(InvalidInput, match="is what hoops@"):
        registry.rm("hoops", all_versions=True)
    registry.rm("hoops:1")
    with pytest.raises(NotFound, match="no version 1"):  # nothing to roll back to any more
        registry.promote("hoops:1", "prod")


def test_of_two_promoters_who_read_the_same_alias_exactly_one_moves_it(registry, full_dir):
    import threading

    for _ in range(2):
        registry.publish(full_dir, name="hoops", **card_fields())
    registry.promote("hoops:1", "prod")
    both_read = threading.Barrier(2)

    def gate(current, card):  # each decides on what it read, then both write
        both_read.wait(timeout=30)

    outcomes: dict[str, object] = {}

    def promoter(ref):
        try:
            outcomes[ref] = registry.promote(ref, "prod", check=gate)
        except Conflict as e:
            outcomes[ref] = e

    threads = [threading.Thread(target=promoter, args=(ref,)) for ref in ("hoops:1", "hoops:2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    won = [o for o in outcomes.values() if not isinstance(o, Conflict)]
    lost = [o for o in outcomes.values() if isinstance(o, Conflict)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert "moved by someone else" in str(lost[0])
    assert registry.get("hoops@prod")[1].version == won[0].version
    assert [m.seq for m in registry.history("hoops", "prod")] == [1, 2]


def test_a_gate_that_refuses_leaves_the_alias_where_it_was(registry, full_dir):
    for _ in range(2):
        registry.publish(full_dir, name="hoops", **card_fields())
    registry.promote("hoops:1", "prod")

    def gate(current, card):
        raise InvalidInput(f"{card.ref} does not beat {current.ref}", where="--promote-if")

    with pytest.raises(InvalidInput, match="does not beat hoops:1"):
        registry.promote("hoops:2", "prod", check=gate)
    assert registry.get("hoops@prod")[1].version == 1 and len(registry.history("hoops")) == 1


def test_cli_promotes_rolls_back_and_shows_the_history(models_cli, registry, full_dir):
    for _ in range(2):
        registry.publish(full_dir, name="hoops", **card_fields())
    assert models_cli("history", "hoops")[:2] == (0, "hoops has no aliases\n")
    assert models_cli("promote", "hoops:1", "--alias", "prod")[:2] == (0, "hoops@prod -> version 1\n")
    code, out, _ = models_cli("promote", "hoops", "--alias", "prod", "--note", "sweep-s1")
    assert (code, out) == (0, "hoops@prod -> version 2 (was version 1)\n")
    assert yaml.safe_load(models_cli("show", "hoops@prod")[1])["version"] == 2
    assert yaml.safe_load(models_cli("show", "hoops:2")[1])["aliases"] == ["prod"]
    code, out, _ = models_cli("list")
    rows = [[cell.strip() for cell in line.split("│")][1:4] for line in out.splitlines() if "hoops" in line]
    assert code == 0 and rows == [["hoops", "1", "-"], ["hoops", "2", "prod"]]
    code, out, _ = models_cli("rollback", "hoops", "--alias", "prod")
    assert (code, out) == (0, "hoops@prod -> version 1 (rolled back from version 2)\n")
    code, out, _ = models_cli("history", "hoops")
    assert code == 0 and "sweep-s1" in out and "rollback" in out and "2 -> 1" in out
    # Mistakes: one line and the error's exit code.
    code, _, err = models_cli("promote", "hoops:7", "--alias", "prod")
    assert code == 3 and "no version 7" in err
    code, _, err = models_cli("promote", "hoops:1", "--alias", "Prod!")
    assert code == 2 and "invalid alias" in err
    code, _, err = models_cli("rm", "hoops:1", "--yes")
    assert code == 2 and "hoops@prod" in err


def test_a_promotion_that_loses_a_race_exits_with_the_conflict_code(models_cli, registry, full_dir, monkeypatch):
    registry.publish(full_dir, name="hoops", **card_fields())
    monkeypatch.setattr(Storage, "create", lambda self, uri, data: False)  # another promoter won
    code, _, err = models_cli("promote", "hoops:1", "--alias", "prod")
    assert code == 11 and "moved by someone else" in err
