"""Product catalogue -> DreamBooth concepts: the concepts file's model, its builder, a synthetic shop."""

from atelier.catalogue.build import BuildReport, build_concepts, load_concepts, style_from_title
from atelier.catalogue.identifiers import allocate_identifiers, validate_identifiers
from atelier.catalogue.schema import (
    CLASSES,
    CatalogueItem,
    Concept,
    ConceptImage,
    ConceptsFile,
    class_prompt,
    instance_prompt,
)
from atelier.catalogue.synth import synth_shop

__all__ = [
    "CLASSES",
    "BuildReport",
    "CatalogueItem",
    "Concept",
    "ConceptImage",
    "ConceptsFile",
    "allocate_identifiers",
    "build_concepts",
    "class_prompt",
    "instance_prompt",
    "load_concepts",
    "style_from_title",
    "synth_shop",
    "validate_identifiers",
]
