"""Toy world: deterministic scenes whose captions match their scene graphs, the export layout, and the packaged VLMs."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from myvlm import toyworld
from myvlm.toyworld import models as tw_models
from myvlm.toyworld.world import COLORS, SceneObject, _mask


def test_rendering_is_deterministic_and_seed_dependent():
    a = np.asarray(toyworld.render_scene(toyworld.sample_scene(5)))
    b = np.asarray(toyworld.render_scene(toyworld.sample_scene(5)))
    c = np.asarray(toyworld.render_scene(toyworld.sample_scene(6)))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert toyworld.sample_scene(5) == toyworld.sample_scene(5)


def test_scene_graph_matches_pixels_and_caption():
    for seed in range(200):
        scene = toyworld.sample_scene(seed)
        assert 1 <= len(scene.objects) <= 3
        masks = [_mask(o) for o in scene.objects]
        assert not any((masks[i] & masks[j]).any() for i in range(len(masks)) for j in range(i))
        pixels = np.asarray(toyworld.render_scene(scene)).astype(int)
        for obj, mask in zip(scene.objects, masks, strict=True):
            if obj.texture == "plain" and obj.shape != "figure":  # a plain object is drawn in exactly its colour
                assert (np.abs(pixels[mask] - COLORS[obj.color]).sum(-1) == 0).all()
        text = toyworld.caption(scene)
        correct, total = toyworld.caption_attribute_accuracy(text, scene)
        assert correct == total, (text, scene)
        assert text[0].isupper() and text.endswith(f" on {scene.background}.")
        named = toyworld.with_names(scene, {0: "Bobby"})
        named_text = toyworld.caption(named)
        assert named_text.startswith("Bobby is") or named_text.startswith("Bobby and")
        assert toyworld.caption_attribute_accuracy(named_text, named) == (total, total) or len(scene.objects) == 1


def test_caption_scoring_penalises_wrong_attributes():
    obj = SceneObject("circle", "red", "small", "plain", 16, 30, 15)
    other = SceneObject("square", "blue", "large", "striped", 45, 30, 25)
    scene = toyworld.Scene("grass", (obj, other), 0)
    assert toyworld.caption(scene) == "A small red circle left of a large blue striped square on grass."
    assert toyworld.caption_attribute_accuracy(toyworld.caption(scene), scene) == (10, 10)
    assert toyworld.caption_attribute_accuracy("A small green circle right of a large blue square on sand.", scene) == (
        6,
        10,
    )
    assert toyworld.caption_attribute_accuracy(
        "Bobby is left of a large blue striped square on grass.", scene, {"Bobby": 0}
    ) == (10, 10)
    assert toyworld.caption_attribute_accuracy("A small red circle on grass.", scene) == (5, 10)


def test_vqa_answers_follow_the_scene_graph():
    rng = np.random.default_rng(0)
    for seed in range(50):
        scene = toyworld.sample_scene(seed)
        pairs = dict(toyworld.vqa_pairs(scene, rng))
        assert pairs["How many objects are there?"] == ("one", "two", "three")[len(scene.objects) - 1]
        for obj in scene.objects:
            if f"What color is the {obj.shape}?" in pairs:
                assert pairs[f"What color is the {obj.shape}?"] == obj.color


def test_pretraining_never_contains_a_personal_concept():
    tokenizer = tw_models.build_tokenizer()
    templates = {(c.shape, c.color, c.mark) for c in toyworld.make_concepts(8)}
    for name in tw_models.TOY_MODELS:
        rng = np.random.default_rng(1)
        marked = 0
        for seed in range(300):
            scene, turns = tw_models._sample(rng, seed, name)
            assert all(o.concept is None and (o.shape, o.color, o.mark) not in templates for o in scene.objects)
            marked += sum(o.mark is not None for o in scene.objects)
        assert marked > 50  # generic dots and hats teach the vision tower marks, never a concept's combination
        assert len(tokenizer) <= 2048
    concept = toyworld.make_concepts(1)[0]
    scene = toyworld.sample_scene(3, concepts=(concept,))
    assert sum(o.mark == concept.mark for o in scene.objects) == 1
    assert toyworld.caption(scene).startswith(concept.identifier)


def test_tokenizer_decodes_natural_text_and_knows_names():
    tokenizer = tw_models.build_tokenizer()
    text = "Bobby is left of a blue striped square on grass."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text
    for name in toyworld.NAMES:
        assert len(tokenizer(f" {name}", add_special_tokens=False)["input_ids"]) <= 2


def test_export_layout(tmp_path):
    out = toyworld.export_dataset(tmp_path / "data", n_concepts=2, seed=0)
    index = json.loads((out / "concepts.json").read_text())["concepts"]
    graphs = json.loads((out / "scene_graphs.json").read_text())
    idents = [c["identifier"] for c in index]
    assert len(set(idents)) == 2 and all(i in toyworld.NAMES for i in idents)
    for c in index:
        ident = c["identifier"]
        for folder, count, personalized in (
            (ident, 4, True),
            (f"{ident}/positives", 20, True),
            (f"{ident}/hard_negatives", 10, False),
        ):
            captions = json.loads((out / folder / "captions.json").read_text())
            assert sorted(captions) == sorted(p.name for p in (out / folder).glob("*.png"))
            assert len(captions) == count
            for file, caps in captions.items():
                assert (ident in caps[0]) == personalized
                scene = toyworld.Scene.from_dict(graphs[f"{folder}/{file}"])
                correct, total = toyworld.caption_attribute_accuracy(caps[0], scene)
                assert correct == total
                marked = [o for o in scene.objects if o.mark == c["mark"]]
                assert len(marked) == int(personalized)
                if not personalized:  # hard negative: same shape and colour, no mark
                    assert any(o.shape == c["shape"] and o.color == c["color"] for o in scene.objects)
    negatives = json.loads((out / "negatives" / "captions.json").read_text())
    assert negatives and not any(i in cap for caps in negatives.values() for cap in caps for i in idents)
    pairs = json.loads((out / "two_concepts" / "captions.json").read_text())
    together = json.loads((out / "together" / "captions.json").read_text())
    assert len(pairs) == 10 and len(together) == 8
    assert all(all(i in caps[0] for i in idents) for caps in [*pairs.values(), *together.values()])
    held_out = {json.dumps(graphs[f"two_concepts/{f}"]["objects"]) for f in pairs}
    assert not held_out & {json.dumps(graphs[f"together/{f}"]["objects"]) for f in together}
    again = toyworld.export_dataset(tmp_path / "again", n_concepts=2, seed=0)
    assert (again / "scene_graphs.json").read_bytes() == (out / "scene_graphs.json").read_bytes()


def test_processor_pixels_match_training_pixels():
    from transformers import AutoProcessor

    image = toyworld.render_scene(toyworld.sample_scene(1))
    for name in tw_models.TOY_MODELS:
        processor = AutoProcessor.from_pretrained(toyworld.model_path(name))
        got = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        assert torch.allclose(got, tw_models.pixels([image]), atol=1e-6)


def test_llava_prompt_tokens_match_pretraining():
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(toyworld.model_path("toy-llava"))
    image = toyworld.render_scene(toyworld.sample_scene(1))
    prompt = toyworld.llava_prompt("Please caption this image of Bobby.")
    ids = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    expanded = prompt.replace("<image>", "<image>" * tw_models.NUM_PATCHES)
    assert ids == processor.tokenizer(expanded)["input_ids"]
    assert ids.count(tw_models.IMAGE_ID) == tw_models.NUM_PATCHES


@pytest.mark.parametrize("name,model_type", [("toy-llava", "llava"), ("toy-blip2", "blip-2")])
def test_packaged_model_loads_and_captions_held_out_scenes(name, model_type):
    from transformers import AutoConfig

    path = toyworld.model_path(name)
    assert AutoConfig.from_pretrained(path).model_type == model_type
    torch.manual_seed(0)
    model, processor = toyworld.load(name)
    scenes = toyworld.held_out_scenes(8, offset=5000)
    captions = toyworld.generate(model, processor, [toyworld.render_scene(s) for s in scenes])
    scores = [toyworld.caption_attribute_accuracy(c, s) for c, s in zip(captions, scenes, strict=True)]
    accuracy = sum(c for c, _ in scores) / sum(t for _, t in scores)
    # regression guard, not the target: the shipped models score ~0.75 on 100 held-out scenes (target 0.95)
    assert accuracy >= 0.6, list(zip(captions, [toyworld.caption(s) for s in scenes], strict=True))
    assert all(c.endswith(".") for c in captions)
    inputs = processor(
        images=[toyworld.render_scene(scenes[0])],
        text=[toyworld.llava_prompt("Please caption this image.") if name == "toy-llava" else ""],
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    attentions = out.attentions if name == "toy-llava" else out.language_model_outputs.attentions
    assert attentions and torch.allclose(attentions[0].sum(-1), torch.ones(()), atol=1e-4)


def test_packaged_weights_are_small():
    total = sum(p.stat().st_size for n in tw_models.TOY_MODELS for p in toyworld.model_path(n).glob("*.safetensors"))
    assert 0 < total <= 25 * 1024 * 1024


@pytest.mark.parametrize("name", tw_models.TOY_MODELS)
def test_build_is_bit_for_bit_reproducible(name, tmp_path):
    digests = []
    for run in ("a", "b"):
        out = toyworld.build_model(name, tmp_path / run, seed=3, progress=False, steps=2, threads=1)
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("name", tw_models.TOY_MODELS)
def test_generate_returns_the_answer_without_the_prompt(name):
    model, processor = toyworld.load(name)
    image = toyworld.render_scene(toyworld.held_out_scenes(1, offset=9000)[0])
    answer = toyworld.generate(model, processor, [image], "How many objects are there?", max_new_tokens=4)[0]
    assert answer and not any(echo in answer for echo in ("Question", "How many", "ASSISTANT")), answer


@pytest.mark.parametrize("name", tw_models.TOY_MODELS)
def test_packaged_models_answer_questions_from_the_image(name):
    model, processor = toyworld.load(name)
    accuracy = tw_models.vqa_accuracy(model, processor, toyworld.held_out_scenes(30))
    # regression guard, not the target: on 100-200 held-out questions toy-llava scores 0.72 and toy-blip2 0.58
    # (target 0.90); one answer in three is right by chance only for position and count questions
    assert accuracy >= 0.4, accuracy


def test_llava_names_the_object_in_the_concept_slot():
    model, processor = toyworld.load("toy-llava")
    for scene in toyworld.held_out_scenes(3, offset=7000):
        image = toyworld.render_scene(scene)
        slot = toyworld.reference_vector(model, image, scene.objects[0])
        text = toyworld.generate_with_slots(model, processor, image, [slot], toyworld.caption_prompt(["Bobby"]))
        assert text.startswith("Bobby is "), text


@pytest.mark.parametrize("model", ["toy-llava", "toy-blip2"])
def test_concept_head_on_the_vision_tower_tells_the_concept_from_its_twin(model):
    """The demo's head: a probe at the best patch of the toy VLM's own vision tower (its encoder resolved by name)."""
    from myvlm.demo import scene_seed_negatives
    from myvlm.heads import ConceptDetector, ObjectHead
    from myvlm.model import resolve_encoder

    data = toyworld.concept_data(n_concepts=1, seed=0, n_positives=20, n_negatives=20, n_hard_negatives=20)[0]
    negatives = scene_seed_negatives(data.concept, 20, seed=0)
    encoder = resolve_encoder(f"vision-tower:{model}")
    head = ObjectHead.train([e.image for e in data.train], negatives, encoder=encoder)
    assert head.calibration["method"] == "region probe" and head.encoder_name == f"vision-tower:{model}"
    found = ConceptDetector({"c": head}, {encoder.name: encoder}).detect(
        [e.image for e in data.positives + data.hard_negatives + data.negatives]
    )
    fired = [bool(f) for f in found]
    recall, hard_false, false = (sum(fired[i : i + 20]) / 20 for i in (0, 20, 40))
    # measured 1.00 / 0.00 / 0.00 (toy-llava) and 1.00 / 0.00 / 0.10 (toy-blip2); the bar is 0.95 / 0.02
    assert recall >= 0.9 and hard_false <= 0.1 and false <= 0.15, (recall, hard_false, false)
