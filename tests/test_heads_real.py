"""Concept heads with the real offline models on real photos from ../shared/data (skipped when it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from myvlm.errors import MyVLMError
from myvlm.heads import ConceptDetector, FaceHead, ObjectHead, embed_regions, get_encoder, head_from_state
from myvlm.heads.objects import calibrate_together
from myvlm.images import collect_images, load_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real test photos not found at {DATA} (only developer and CI machines have them)"
)


def photos(*parts: str) -> list[Path]:
    return collect_images([DATA.joinpath(*parts)])


@pytest.fixture(scope="module")
def people() -> dict[str, FaceHead]:
    return {
        person: FaceHead.enroll([load_image(p) for p in photos("faces", person)[:3]])
        for person in ("person_a", "person_f")
    }


@pytest.fixture(scope="module")
def backpack() -> ObjectHead:
    return ObjectHead.train([load_image(p) for p in photos("dreambooth", "backpack")[:4]])


def test_face_head_finds_the_known_face_in_a_group_photo(people):
    detector = ConceptDetector(people)
    couple = load_image(DATA / "faces" / "group" / "couple.jpg")
    detections = detector.detect([couple])[0]
    assert [d.concept for d in detections] == ["person_a"]  # the man is a stranger, 0.57 from person_f
    x0, y0, x1, y1 = detections[0].box
    assert x1 < couple.width / 2 and detections[0].score > 0.6
    scores = detector.scores([couple])[0]
    assert 1 - people["person_f"].threshold > scores["person_f"] > 0.35


def test_face_head_identifies_unseen_photos_and_rejects_others(people):
    detector = ConceptDetector(people)
    images = [load_image(photos("faces", "person_a")[-1]), load_image(photos("faces", "person_c")[0])]
    assert [[d.concept for d in found] for found in detector.detect(images)] == [["person_a"], []]


def test_enrolment_names_the_photo_without_a_face():
    no_face = photos("dreambooth", "can")[0]
    with pytest.raises(MyVLMError, match=rf"{no_face.name}: no face found"):
        FaceHead.enroll([load_image(no_face)], sources=[str(no_face)])


def test_object_head_fires_on_new_photos_of_its_object_only(backpack):
    held_out = [load_image(p) for p in photos("dreambooth", "backpack")[4:]]
    others = [load_image(photos("dreambooth", s)[0]) for s in ("backpack_dog", "dog", "can", "fancy_boot")]
    others += [load_image(p) for p in photos("negatives")[:3]]
    probabilities = backpack.probabilities(embed_regions(get_encoder(), held_out + others))
    assert (probabilities[: len(held_out)] >= 0.5).all()
    assert (probabilities[len(held_out) :] < 0.5).all()
    assert 0.7 <= backpack.calibration["cosine_threshold"] <= 0.8


def test_regions_come_from_one_pass_and_follow_the_mirror_image():
    encoder = get_encoder()
    photo = load_image(photos("dreambooth", "can")[0])
    regions = embed_regions(encoder, [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    # the whole photo, then the 3x3 grid of 5x5-cell windows and the 4x4 grid of 4x4-cell windows of the 7x7 map
    assert regions.shape == (2, 1 + 9 + 16, encoder.dim)
    assert encoder.region_boxes().shape == (1 + 9 + 16, 4)
    torch.testing.assert_close(regions[0, 0], encoder.embed([photo])[0])
    for start, side in ((1, 3), (10, 4)):
        grid = slice(start, start + side * side)
        mirrored_grid = regions[1, grid].reshape(side, side, -1).flip(1).reshape(side * side, -1)
        assert (regions[0, grid] * mirrored_grid).sum(-1).min() > 0.99  # mirror-averaged: the same windows, mirrored


def test_lite2_encoder_loads_its_packaged_imagenet_weights():
    encoder = get_encoder("efficientnet-lite2")
    dog = load_image(photos("dreambooth", "dog")[0])
    logits = encoder.model(encoder.preprocess(dog)[None])
    assert 151 <= int(logits.argmax()) <= 268  # an ImageNet dog breed: the Lite2 stages match the shipped weights
    # the whole photo, the 3x3 grid of 7x7-cell and the 4x4 grid of 6x6-cell windows of the 9x9 map
    assert embed_regions(encoder, [dog]).shape == (1, 1 + 9 + 16, encoder.dim)
    assert encoder.region_boxes().shape == (1 + 9 + 16, 4)


def test_mixed_detector_and_saved_heads_agree(people, backpack):
    heads = {"bobby": people["person_a"], "my backpack": backpack}
    restored = {name: head_from_state(head.config(), head.state_dict()) for name, head in heads.items()}
    images = [load_image(photos("dreambooth", "backpack")[-1]), load_image(photos("faces", "person_a")[-1])]
    original, reloaded = ConceptDetector(heads), ConceptDetector(restored)
    assert [[d.concept for d in found] for found in original.detect(images)] == [["my backpack"], ["bobby"]]
    assert original.detect(images) == reloaded.detect(images)


def test_enrolment_refuses_two_people_and_says_which_face_of_a_group_photo_it_took():
    mixed = photos("faces", "person_a")[:2] + photos("faces", "person_b")[:2]
    with pytest.raises(MyVLMError, match=r"2 different people \(img1.jpg \+ img10.jpg; img26.jpg \+ img27.jpg\)"):
        FaceHead.enroll([load_image(p) for p in mixed], sources=[p.name for p in mixed])
    group = DATA / "faces" / "group" / "couple.jpg"
    enrolment = photos("faces", "person_a")[:2] + [group]
    head = FaceHead.enroll([load_image(p) for p in enrolment], sources=[p.name for p in enrolment])
    # the woman (left) is person_a: chosen because she matches the other photos, though both faces are as large
    assert len(head.notes) == 1 and head.notes[0].startswith("couple.jpg: 2 faces; enrolled face 1 from the left")
    assert 0.4 <= head.threshold <= 0.5  # the person's own threshold: bounded by their enrolment spread and the cap


def test_object_detections_give_the_best_regions_box_in_pixels(backpack):
    photo = load_image(photos("dreambooth", "backpack")[-1])
    (detection,) = ConceptDetector({"backpack": backpack}).detect([photo])[0]
    left, top, right, bottom = detection.box
    assert 0 <= left < right <= photo.width and 0 <= top < bottom <= photo.height
    assert (right - left) >= photo.width * 5 / 7 - 1e-3  # the whole photo or a 5x5-cell window of the 7x7 map


def test_few_object_photos_warn_and_same_kind_concepts_calibrate_each_other(backpack):
    few = ObjectHead.train([load_image(p) for p in photos("dreambooth", "backpack_dog")[:2]])
    assert len(few.notes) == 1 and few.notes[0].startswith("only 2 photos")
    restored = head_from_state(backpack.config(), backpack.state_dict())
    before = float(restored.bias)
    assert calibrate_together("backpack_dog", few, {"backpack": restored}) == ["backpack"]
    assert restored.rivals == ["backpack_dog"] and few.rivals == ["backpack"]
    assert float(restored.bias) <= before  # thresholds only go up (bias = -TEMPERATURE * cosine threshold)
    cosines = few.photos.float() @ restored.weight / restored.weight.norm()
    assert cosines.amax(1).max() < restored.calibration["cosine_threshold"]  # the rival's photos are below it
