"""The core's single entry points: concepts enter through `activate`/`Backend.inject` only, the vectors are one
module (`ConceptEmbeddings`), `TrainingConfig` refuses bad values by name, and naming is scored one way everywhere."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from myvlm import MyVLMError, TrainingConfig
from myvlm.embeddings import ConceptEmbeddings
from myvlm.text import naming_metrics
from myvlm.training import CAPTION, Example, initial_vector, learn_concept
from tiny_vlms import photos, tiny_blip2, tiny_llava


@pytest.mark.parametrize("make", [tiny_llava, lambda: tiny_blip2("opt")], ids=["llava", "blip2"])
def test_activate_then_loss_records_the_regularizer_without_setting_the_batch(make):
    """Was `AttributeError: 'NoneType' object has no attribute 'inputs'` on LLaVA: only training set the batch."""
    vlm = make()
    vlm.add_concept("bobby", "Bobby", torch.ones(vlm.concept_width))
    batch = vlm.backend.encode(photos(2), [vlm.backend.prompt("caption", ["Bobby"])] * 2, [1, 1], ["Bobby .", "Bobby"])
    with vlm.activate([["bobby"], ["bobby"]], record_attention=True):
        loss = vlm.backend.loss(batch)
        regularizer = vlm.backend.regularizer("caption")
    with vlm.activate([["bobby"], ["bobby"]], record_attention=True, batch=batch):
        again = vlm.backend.loss(batch) + vlm.backend.regularizer("caption")
    assert torch.isfinite(loss) and regularizer.item() > 0
    assert torch.equal(again, loss + regularizer)
    assert vlm.backend.injection is None  # nothing stays behind after the block


def test_injection_is_read_only_and_does_not_nest():
    vlm = tiny_llava()
    with pytest.raises(AttributeError):
        vlm.backend.injection = None
    empty = [torch.zeros(0, vlm.concept_width)]
    with vlm.backend.inject(empty), pytest.raises(RuntimeError, match="does not nest"), vlm.backend.inject(empty):
        pass


def test_concept_embeddings_module_holds_names_a_parameter_name_may_not():
    embeddings = ConceptEmbeddings(4)
    embeddings.add("Dr. Who", "Who", torch.arange(4.0))
    embeddings.add("mug", "Mug", torch.ones(4))
    assert list(embeddings) == ["Dr. Who", "mug"] and "mug" in embeddings and len(embeddings) == 2
    assert embeddings["Dr. Who"].identifier == "Who" and torch.equal(embeddings["Dr. Who"].vector, torch.arange(4.0))
    assert [p.requires_grad for p in embeddings.parameters()] == [False, False]
    kept = embeddings.snapshot(["mug"])
    trainable = embeddings.set("mug", torch.zeros(4), trainable=True)
    assert trainable.requires_grad and any(p is trainable for p in embeddings.parameters())
    embeddings.restore(kept)
    assert torch.equal(embeddings.vector("mug"), torch.ones(4))
    assert embeddings.stack(["mug", "Dr. Who"]).shape == (2, 4) and embeddings.stack([]).shape == (0, 4)
    embeddings.remove("Dr. Who")
    assert list(embeddings) == ["mug"] and len(list(embeddings.parameters())) == 1
    with pytest.raises(MyVLMError, match="width 3 does not match"):
        embeddings.add("cup", "Cup", torch.ones(3))


def test_learned_vector_is_the_models_and_training_optimizes_its_parameter():
    vlm = tiny_llava()
    result = learn_concept(
        vlm,
        "bobby",
        "Bobby",
        photos(2),
        [Example(0, ("Bobby .",)), Example(1, ("Bobby is here .",))],
        TrainingConfig(steps=2, batch_size=2),
        progress=False,
    )
    assert torch.equal(vlm.embeddings.vector("bobby"), result.vector)
    assert not vlm.embeddings.vector("bobby").requires_grad  # frozen again after training


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("task", "captions"),
        ("steps", 0),
        ("steps", 2.5),
        ("batch_size", -1),
        ("lr", 0.0),
        ("lr", math.nan),
        ("weight_decay", -1e-4),
        ("max_grad_norm", math.inf),
        ("reg_lambda", -0.5),
        ("augment", "yes"),
        ("seed", 1.5),
        ("starts", 0),
        ("probe_steps", 0),
    ],
)
def test_training_config_rejects_bad_values_naming_field_and_value(field, value):
    with pytest.raises(MyVLMError) as error:
        TrainingConfig(**{field: value})
    assert field in str(error.value) and repr(value) in str(error.value), str(error.value)


def test_training_config_documents_every_field():
    from dataclasses import fields

    doc = TrainingConfig.__doc__
    assert "Args:" in doc
    assert all(f"    {f.name}: " in doc for f in fields(TrainingConfig)), [f.name for f in fields(TrainingConfig)]


def test_naming_metrics_count_whole_words_as_evaluate_and_demo_do():
    texts = ["Max is on the sofa.", "Maxine is on the sofa.", "a dog (Max).", "Max."]
    metrics = naming_metrics(texts, "Max", [True, True, False, False])
    # "Maxine" does not name Max: recall 1/2; Max is named on 3 photos, 1 of them a positive: precision 1/3.
    assert (metrics.recall, metrics.precision) == (0.5, 1 / 3)
    assert metrics.f1 == pytest.approx(2 * 0.5 / 3 / (0.5 + 1 / 3))
    assert naming_metrics(["a dog"], "Max", [True]) == naming_metrics(["a dog"], "Max", [True])
    assert naming_metrics(["a dog"], "Max", [True]).precision == 0.0


def reference_learn(vlm, name, identifier, images, examples, config):
    """The training loop as it was written before the core redesign (ac9c4af's `_Run.descend`, official single-start
    loop, uncached), kept as the reference the refactored loop must match bit for bit."""
    from myvlm.augment import augment

    backend = vlm.backend
    rng, view_pick = np.random.default_rng(config.seed), np.random.default_rng([config.seed, 1])
    vlm.add_concept(name, identifier, torch.zeros(vlm.concept_width))
    vector = torch.nn.Parameter(initial_vector(vlm.concept_width, config.seed).clone().float())
    vlm.concepts.set(name, vector)
    optimizer = torch.optim.AdamW([vector], lr=config.lr, weight_decay=config.weight_decay)
    order, losses = [], []
    for _ in range(config.steps):
        picked = []
        while len(picked) < config.batch_size:
            if not order:
                order = list(rng.permutation(len(examples)))
            picked.append(examples[order.pop()])
        targets = [e.answers[int(rng.integers(len(e.answers)))] for e in picked]
        prompts = [backend.prompt(CAPTION, [identifier]) for _ in picked]
        views = [augment(images[e.image], view_pick) for e in picked]
        batch = backend.encode(views, prompts, [1] * len(picked), targets)
        with vlm.activate([[name]] * len(picked), record_attention=True, batch=batch):
            loss = backend.loss(batch) + backend.regularizer(config.task, config.reg_lambda)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([vector], config.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
    return vector.detach().clone(), losses


@pytest.mark.parametrize("make", [tiny_llava, lambda: tiny_blip2("opt")], ids=["llava", "blip2"])
def test_training_loop_matches_the_reference_loop_bit_for_bit(make):
    examples = [Example(0, ("Bobby is on the sofa .", "Bobby .")), Example(1, ("Bobby is here .",))]
    config = TrainingConfig(steps=3, batch_size=3, starts=1, seed=5)
    expected, expected_losses = reference_learn(make(), "bobby", "Bobby", photos(2), examples, config)
    result = learn_concept(make(), "bobby", "Bobby", photos(2), examples, config, views_per_image=None, progress=False)
    assert torch.equal(result.vector, expected) and result.losses == expected_losses


@pytest.mark.parametrize("mode", ["L", "RGBA", "RGB"])
def test_augmentation_takes_every_photo_mode(mode):
    """A grayscale or transparent photo handed to `learn` as it is (no load_image) trains like an RGB one."""
    from PIL import Image

    from myvlm.augment import augment

    image = Image.new("RGB", (32, 24), (200, 100, 50)).convert(mode)
    view = augment(image, np.random.default_rng(0), flip_p=0.0, brightness=0.0, max_degrees=30.0)
    assert view.mode == mode and view.size == image.size
    assert view.getpixel((0, 0)) in (0, (0, 0, 0, 0), (0, 0, 0))  # a rotated-in corner is black


@pytest.mark.parametrize(("mode", "value"), [("P", 5), ("1", 1), ("I", 40000), ("F", 123.5), ("I;16", 50000)])
def test_augmentation_takes_palette_bilevel_and_high_bit_depth_photos_as_rgb(mode, value):
    """Pillow cannot change the brightness of a palette, 1-bit or 16/32-bit photo (`learn` on a GIF or a 16-bit PNG
    opened with Image.open crashed with "image has wrong mode"): those views are made from the photo in RGB."""
    from PIL import Image

    from myvlm.augment import augment
    from myvlm.images import to_rgb

    image = Image.new(mode, (32, 24), value)
    if mode == "P":
        image.putpalette([200, 100, 50] * 256)
    view = augment(image, np.random.default_rng(0), flip_p=0.0, brightness=0.0, max_degrees=30.0)
    assert view.mode == "RGB" and view.size == image.size
    assert view.getpixel((0, 0)) == (0, 0, 0)  # a rotated-in corner is black
    assert view.getpixel((16, 12)) == to_rgb(image).getpixel((16, 12)) != (0, 0, 0)  # the middle keeps the photo
