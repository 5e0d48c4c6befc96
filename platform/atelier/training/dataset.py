"""A concepts file and its images, committed to S3 as one content-addressed dataset."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from atelier.catalogue.build import load_concepts
from atelier.catalogue.schema import ConceptsFile
from atelier.errors import InvalidInput, NotFound
from atelier.models.tokenizer import build_clip_tokenizer
from atelier.storage import Progress, Storage, sha256_file


def commit_dataset(storage: Storage, concepts_path: Path, *,
                   progress: Progress | None = None) -> tuple[str, str, ConceptsFile]:
    """Upload a concepts file and its images as one committed, content-addressed dataset.

    The dataset's name is the hash of its concepts (which pin every image by sha256), so the same
    data is uploaded once and a model's card can name exactly what it was trained on.
    """
    concepts = load_concepts(concepts_path, build_clip_tokenizer())
    if not concepts.concepts:
        raise InvalidInput("no concepts to train", where=str(concepts_path))
    root = Path(concepts_path).parent
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp, "images")
        images.mkdir()
        portable = concepts.model_copy(deep=True)
        for concept in portable.concepts:
            for image in concept.images:
                source = image.resolve(root)
                if not source.is_file():
                    raise NotFound("image listed in the concepts file is missing", where=str(source))
                if sha256_file(source) != image.sha256:
                    raise InvalidInput("image changed since the concepts file was built "
                                       "(sha256 differs); rebuild it", where=str(source))
                name = f"{image.sha256[:16]}{source.suffix.lower()}"
                (images / name).write_bytes(source.read_bytes())
                image.path = f"images/{name}"
        digest = hashlib.sha256(portable.model_dump_json().encode()).hexdigest()
        uri = dataset_uri(storage, digest)
        if not storage.has_manifest(uri):
            portable.dump(Path(tmp, "concepts.yaml"))
            storage.commit(tmp, uri, {"kind": "dataset", "sha256": digest,
                                      "concepts": [c.name for c in portable.concepts]},
                           progress=progress)
    return uri, digest, concepts


def dataset_uri(storage: Storage, sha256: str) -> str:
    """Where the dataset of that content hash is committed (a model card names it by its hash)."""
    return storage.uri("datasets", sha256[:20])
