"""Product catalogue -> DreamBooth concepts: the concepts file's model, its builder, a synthetic shop."""

from atelier.catalogue.build import (
    BuildReport,
    CatalogueInvalid,
    Problem,
    build_concepts,
    load_concepts,
    style_from_title,
)
from atelier.catalogue.identifiers import allocate_identifiers, validate_identifiers
from atelier.catalogue.pixels import open_rgb
from atelier.catalogue.schema import (
    CLASSES,
    CatalogueItem,
    Concept,
    ConceptImage,
    ConceptsFile,
    class_phrase,
    class_prompt,
    instance_prompt,
    singular,
)
from atelier.catalogue.synth import synth_shop

__all__ = [
    "CLASSES",
    "BuildReport",
    "CatalogueInvalid",
    "CatalogueItem",
    "Concept",
    "ConceptImage",
    "ConceptsFile",
    "allocate_identifiers",
    "build_concepts",
    "class_phrase",
    "class_prompt",
    "instance_prompt",
    "load_concepts",
    "open_rgb",
    "Problem",
    "singular",
    "style_from_title",
    "synth_shop",
    "validate_identifiers",
]
