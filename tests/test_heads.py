"""Concept-head mechanics that need no photos: encoder registry, calibration, scoring, serialization, ordering."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from myvlm.errors import MyVLMError
from myvlm.heads import (
    ConceptDetector,
    FaceHead,
    ObjectHead,
    embed_regions,
    get_encoder,
    head_from_state,
    register_encoder,
)
from myvlm.heads.objects import (
    VIEWS_PER_PHOTO,
    augmented_views,
    calibrate_threshold,
    generic_negative_images,
    leave_one_out_scores,
    photo_view_features,
    view_counts,
    with_real_negatives,
)


class ColourEncoder:
    """Embeds a photo as its mean colour: enough to tell solid-colour test images apart."""

    name = "test-colour"
    dim = 3
    similarity_band = (0.0, 1.0)

    def __init__(self):
        self.calls = 0

    def embed(self, images):
        self.calls += 1
        means = torch.tensor(np.stack([np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0) for image in images]))
        return torch.nn.functional.normalize(means + 1.0, dim=-1)


@pytest.fixture
def colour_encoder() -> ColourEncoder:
    register_encoder(ColourEncoder.name, ColourEncoder)
    return get_encoder(ColourEncoder.name)


def solid(colour) -> Image.Image:
    return Image.new("RGB", (32, 32), colour)


def test_registry_caches_and_rejects_unknown(colour_encoder):
    assert get_encoder(ColourEncoder.name) is colour_encoder
    with pytest.raises(MyVLMError, match="unknown image encoder 'nope'"):
        get_encoder("nope")


def test_object_head_separates_colours_and_round_trips(colour_encoder):
    reds = [solid((250, 10, 10)), solid((240, 20, 5)), solid((230, 5, 15))]
    head = ObjectHead.train(reds, negatives=[solid((10, 10, 250))], encoder=ColourEncoder.name)
    probabilities = head.probabilities(colour_encoder.embed([solid((245, 12, 8)), solid((10, 240, 10))]))
    assert probabilities[0] > 0.5 > probabilities[1]
    config = json.loads(json.dumps(head.config()))
    restored = head_from_state(config, head.state_dict())
    assert config["encoder"] == ColourEncoder.name and config["calibration"]["positives"] == 3
    assert torch.equal(restored.weight, head.weight) and torch.equal(restored.bias, head.bias)


def test_detector_runs_encoder_once_and_orders_by_score(colour_encoder):
    heads = {
        "red": ObjectHead.train([solid((250, 0, 0)), solid((240, 10, 0))], encoder=ColourEncoder.name),
        "also_red": ObjectHead.train([solid((250, 0, 0)), solid((230, 0, 10))], encoder=ColourEncoder.name),
        "green": ObjectHead.train([solid((0, 250, 0)), solid((10, 240, 0))], encoder=ColourEncoder.name),
    }
    detector = ConceptDetector(heads)
    calls = colour_encoder.calls
    detections = detector.detect([solid((250, 0, 0)), solid((0, 0, 250))])
    assert colour_encoder.calls == calls + 1
    assert {d.concept for d in detections[0]} == {"red", "also_red"} and detections[1] == []
    assert [d.score for d in detections[0]] == sorted((d.score for d in detections[0]), reverse=True)
    scores = detector.scores([solid((0, 250, 0))])[0]
    assert set(scores) == set(heads) and scores["green"] > 0.5 > scores["red"]


def test_calibration_uses_the_band_and_negatives():
    threshold, _ = calibrate_threshold(torch.tensor([]), torch.tensor([]), (0.7, 0.8))
    assert threshold == pytest.approx(0.75)  # one photo: middle of the band
    threshold, stats = calibrate_threshold(torch.tensor([]), torch.tensor([0.9]), (0.7, 0.8))
    assert threshold == pytest.approx(0.92) and stats["highest_generic_negative"] == pytest.approx(0.9)
    assert with_real_negatives(stats, 0.95) == pytest.approx(0.97) and with_real_negatives(stats, 0.5) == threshold


def test_leave_one_out_scores_each_photo_by_its_best_region():
    axes = torch.eye(3)
    views = [axes[:1], axes[:1], axes[:1]]
    whole_only = [axes[1:2]] * 3  # held-out photos that do not match the others' prototype at all
    threshold, stats = calibrate_threshold(leave_one_out_scores(whole_only, views), torch.tensor([]), (0.0, 1.0))
    assert stats["loo_mean"] == pytest.approx(0.0)
    with_region = [torch.stack([axes[1], axes[0]])] * 3  # ...until one of their regions shows the object
    threshold, stats = calibrate_threshold(leave_one_out_scores(with_region, views), torch.tensor([]), (0.0, 1.0))
    assert stats["loo_mean"] == pytest.approx(1.0) and threshold == pytest.approx(1.0)


def test_region_features_score_by_their_best_region(colour_encoder):
    head = ObjectHead.train([solid((250, 0, 0)), solid((240, 10, 0))], encoder=ColourEncoder.name)
    photos = embed_regions(colour_encoder, [solid((0, 0, 250)), solid((250, 0, 0))])
    assert photos.shape == (2, 1, 3)  # an encoder without regions gives the whole photo only
    regions = torch.cat([photos[:1], photos[1:]], dim=1)  # one photo: a blue whole, a red region
    assert head.probabilities(regions)[0] == pytest.approx(head.probabilities(photos[1:, 0])[0])
    assert head.probabilities(photos[:1, 0])[0] < 0.5


def test_views_and_generic_negatives_are_deterministic():
    first, second = generic_negative_images(4), generic_negative_images(4)
    assert [image.tobytes() for image in first] == [image.tobytes() for image in second]
    counts = {"geometric": 2, "colour": 1, "zoom_out": 1}
    views = [augmented_views(first[1], random.Random(7), counts) for _ in range(2)]
    assert len(views[0]) == 4 and [view.tobytes() for view in views[0]] == [view.tobytes() for view in views[1]]
    assert sum(view_counts().values()) == VIEWS_PER_PHOTO
    assert view_counts(44) == {"geometric": 24, "colour": 12, "zoom_out": 8}


def test_a_photos_views_do_not_depend_on_the_other_photos(colour_encoder):
    """Views are drawn from each photo's own pixels: the head is the same in any order, and benchmarks/heads.py
    (which computes each photo's views once for every fold) measures the views `concept add` makes."""
    photos = [generic_negative_images(3)[index] for index in range(3)]
    whole = colour_encoder.embed(photos[:1])
    features = photo_view_features(colour_encoder, photos[0], whole)
    assert features.shape == (1 + VIEWS_PER_PHOTO, 3) and torch.equal(features[:1], whole)
    assert torch.equal(features, photo_view_features(colour_encoder, photos[0], whole))
    assert not torch.equal(features, photo_view_features(colour_encoder, photos[0], whole, seed=1))
    forward = ObjectHead.train(photos, encoder=ColourEncoder.name)
    backward = ObjectHead.train(photos[::-1], encoder=ColourEncoder.name)
    assert torch.allclose(forward.weight, backward.weight, atol=1e-6)
    assert forward.calibration["loo_mean"] == pytest.approx(backward.calibration["loo_mean"], abs=1e-6)


def test_errors_are_clear():
    with pytest.raises(MyVLMError, match="at least one photo"):
        ObjectHead.train([])
    with pytest.raises(MyVLMError, match="unknown concept head type"):
        head_from_state({"type": "mystery"}, {})
    with pytest.raises(MyVLMError, match="unknown face backend"):
        FaceHead(torch.zeros(1, 128), backend="mystery")


def test_transformers_clip_encoder_from_a_local_checkpoint(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from myvlm.heads import register_transformers_encoder

    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 100, "eos_token_id": 2},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    register_transformers_encoder("tiny-clip", tmp_path)
    features = get_encoder("tiny-clip").embed([solid((200, 0, 0)), solid((0, 0, 200))])
    assert features.shape == (2, 8) and torch.allclose(features.norm(dim=1), torch.ones(2))
    head = ObjectHead.train([solid((200, 0, 0)), solid((190, 10, 0))], encoder="tiny-clip")
    assert head.config()["encoder"] == "tiny-clip" and head.config()["dim"] == 8
    register_transformers_encoder("missing-clip", tmp_path / "missing")
    with pytest.raises(MyVLMError, match="not a transformers CLIP/SigLIP checkpoint"):
        get_encoder("missing-clip")


def test_insightface_backend_explains_what_is_missing():
    try:
        import insightface  # noqa: F401
    except ImportError:
        with pytest.raises(MyVLMError, match="pip install insightface"):
            FaceHead(torch.zeros(1, 512), backend="insightface")
    else:
        pytest.skip("insightface is installed here; the missing-package message cannot be exercised")


def test_of_two_rival_heads_firing_on_one_region_the_closer_one_wins(colour_encoder):
    def head(colour, rivals=()):
        direction = colour_encoder.embed([solid(colour)])[0]
        return ObjectHead(20 * direction, torch.tensor([-20 * 0.9]), ColourEncoder.name, rivals=rivals)

    red, orange = (250, 10, 10), (250, 120, 10)
    photo = solid(red)
    apart = ConceptDetector({"red": head(red), "orange": head(orange)}).detect([photo])[0]
    assert [d.concept for d in apart] == ["red", "orange"]  # both fire: neither knows the other
    rivals = ConceptDetector({"red": head(red, ["orange"]), "orange": head(orange)}).detect([photo])[0]
    assert [(d.concept, d.box) for d in rivals] == [("red", (0.0, 0.0, 32.0, 32.0))]  # one region: the whole photo


def test_concept_add_builds_an_object_head_on_one_thread_and_restores_torchs(colour_encoder, tmp_path, monkeypatch):
    from myvlm.cli import main

    threads_seen = []
    embed = colour_encoder.embed
    monkeypatch.setattr(
        colour_encoder, "embed", lambda images: threads_seen.append(torch.get_num_threads()) or embed(images)
    )
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    paths = []
    for index, colour in enumerate([(250, 0, 0), (240, 10, 0), (245, 5, 5)]):
        paths.append(str(tmp_path / f"red{index}.png"))
        solid(colour).save(paths[-1])
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        add = ["concept", "add", "red", "--kind", "object", "--images", *paths, "--encoder", ColourEncoder.name]
        assert main([*add, "--library", str(tmp_path / "library")]) == 0
        assert threads_seen and set(threads_seen) == {1}  # every encoder pass ran on one thread...
        assert torch.get_num_threads() == 2  # ...and torch's own setting is back for whatever runs next
    finally:
        torch.set_num_threads(previous)
