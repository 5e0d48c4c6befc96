"""Ray job: evaluate a registered model (`atelier eval MODEL`).

    python -m atelier_jobs.evaluate --spec '<EvalSpec JSON>'

Per concept of the model's card: images from fixed prompts and seeds by the model and by its base,
the metrics against the concept's photos in the training dataset (atelier.quality.evaluation), a
comparison grid (real | base | model); then the evaluation and the grids are committed beside the
model in the registry, where `atelier models show/list` read them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import ray

from atelier.catalogue.schema import ConceptsFile
from atelier.errors import InvalidInput
from atelier.quality.results import ConceptEvaluation, EvalSpec, Evaluation
from atelier.storage import Storage
from atelier.training import events
from atelier.training.dataset import dataset_uri


@ray.remote(num_cpus=1)
def evaluate(spec_json: str) -> str:
    """The whole evaluation in one Ray task (one CPU: the models are small, the encoders too)."""
    import torch
    from PIL import Image

    from atelier.models.load import load_model
    from atelier.quality import encoders
    from atelier.quality.evaluation import evaluate_concept, now
    from atelier.quality.gallery import comparison_grid
    from atelier.registry import Registry

    torch.set_num_threads(1)
    spec = EvalSpec.model_validate_json(spec_json)
    cfg = spec.config
    storage = Storage()
    registry = Registry(storage)
    _, card = registry.get(spec.model)
    dataset = storage.fetch_cached(dataset_uri(storage, card.dataset_sha256))
    concepts = {c.name: c for c in ConceptsFile.load(dataset / "concepts.yaml").concepts}
    missing_concepts = [c.name for c in card.concepts if c.name not in concepts]
    if missing_concepts:
        raise InvalidInput(f"the training dataset has no concept {', '.join(missing_concepts)}",
                           where=card.ref)

    clip = _encoder(encoders.ClipEncoder, "clip", cfg.clip_encoder,
                    "no CLIP encoder configured (clip_encoder)")
    dino = _encoder(encoders.DinoEncoder, "dino", cfg.dino_encoder,
                    "no DINO encoder configured (dino_encoder; production: facebook/dino-vits16 "
                    "copied to S3); none is trained offline")

    pipe = load_model(card.ref, storage=storage)
    base = load_model(card.base_model, storage=storage) if cfg.compare_base else None
    # IS and class accuracy classify over the classes the dataset has.
    labels = {c.class_name: c.class_prompt for c in concepts.values()}
    results: list[ConceptEvaluation] = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "grids").mkdir()
        for done, concept_card in enumerate(card.concepts, start=1):
            concept = concepts[concept_card.name]
            # The card's prompts are the ones the model was trained with.
            concept = concept.model_copy(update={"identifier": concept_card.identifier,
                                                 "instance_prompt": concept_card.instance_prompt,
                                                 "class_prompt": concept_card.class_prompt})
            real = [Image.open(image.resolve(dataset)).convert("RGB") for image in concept.images]
            result, made = evaluate_concept(pipe, base, concept, real, cfg, clip, dino, labels)
            rows = [("real photos", real)]
            if made["base"]:
                rows.append(("base model", made["base"]["instance"]))
            rows.append(("fine-tuned", made["model"]["instance"]))
            grid = f"grids/{concept.name}.png"
            comparison_grid(rows).save(Path(tmp) / grid)
            results.append(result.model_copy(update={"grid": grid}))
            events.emit(events.Evaluated(model=card.ref, concept=concept.name, done=done,
                                         total=len(card.concepts),
                                         metrics={m.metric: m.value for m in result.metrics}))
        evaluation = Evaluation(model=card.ref, base_model=card.base_model, evaluated_at=now(),
                                config=cfg, concepts=results)
        registry.record_evaluation(tmp, evaluation)
    return evaluation.model_dump_json()


def _encoder(cls, kind: str, ref: str | None, unset: str):
    """The encoder, or a metrics.Absent that says why there is none."""
    from atelier.quality.encoders import EncoderMissing
    from atelier.quality.metrics import Absent

    if not ref:
        return Absent(unset)
    try:
        return cls.load(ref)
    except EncoderMissing as e:
        return Absent(f"{kind.upper()} encoder {ref}: {e.message}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="EvalSpec as JSON")
    spec = EvalSpec.model_validate_json(parser.parse_args(argv).spec)
    ray.init(log_to_driver=True)
    ray.get(evaluate.remote(spec.model_dump_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
