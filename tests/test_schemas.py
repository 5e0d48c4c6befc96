"""Generated files never drift: schemas/ must equal what `make generate` writes now."""

from atelier import schemas
from support import REPO


def test_committed_schemas_match_the_models():
    rendered = schemas.render()
    folder = REPO / "schemas"
    on_disk = {p.name for p in folder.glob("*.schema.json")}
    assert on_disk == set(rendered), "run `make generate` and commit the result"
    for name, text in rendered.items():
        assert (folder / name).read_text() == text, f"{name} drifted: run `make generate`"


def test_schemas_forbid_unknown_keys():
    import json

    concepts = json.loads(schemas.render()["concepts.schema.json"])
    assert concepts["additionalProperties"] is False
