"""Toy world: a seeded scene renderer with exact ground truth and two tiny pretrained VLMs (toy-llava, toy-blip2).

It makes personalization measurable offline: concept images, hard negatives and captions are generated, and captions
are scored against the scene graph.
"""

from myvlm.toyworld.data import ConceptData, Example, concept_data, export_dataset, two_concept_examples
from myvlm.toyworld.models import (
    HEAD_ENCODER,
    TOY_MODELS,
    blip2_vqa_prompt,
    build_model,
    evaluate_base,
    evaluate_named,
    generate,
    generate_with_slots,
    held_out_scenes,
    llava_prompt,
    load,
    model_path,
    name_code,
    object_patches,
    reference_vector,
)
from myvlm.toyworld.world import (
    NAMES,
    Concept,
    Scene,
    SceneObject,
    caption,
    caption_attribute_accuracy,
    caption_prompt,
    make_concepts,
    render_scene,
    sample_scene,
    vqa_pairs,
    with_names,
)

__all__ = [
    "Concept",
    "ConceptData",
    "Example",
    "HEAD_ENCODER",
    "TOY_MODELS",
    "NAMES",
    "Scene",
    "SceneObject",
    "blip2_vqa_prompt",
    "build_model",
    "caption",
    "caption_attribute_accuracy",
    "caption_prompt",
    "concept_data",
    "evaluate_base",
    "evaluate_named",
    "export_dataset",
    "generate",
    "generate_with_slots",
    "held_out_scenes",
    "llava_prompt",
    "load",
    "make_concepts",
    "model_path",
    "name_code",
    "object_patches",
    "reference_vector",
    "render_scene",
    "sample_scene",
    "two_concept_examples",
    "vqa_pairs",
    "with_names",
]
