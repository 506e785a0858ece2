"""Learning a concept end to end: after 100 steps on 4 photos the model names the concept on those photos and on
augmented views of them, and only when the concept is switched on. LLaVA and BLIP-2-OPT run on the packaged toy VLMs
(pretrained on toyworld), BLIP-2-Flan-T5 on a tiny model pretrained in the test the same way."""

from __future__ import annotations

import numpy as np
import pytest

import myvlm
from myvlm.augment import augment
from myvlm.toyworld import concept_data
from myvlm.training import TrainingConfig
from tiny_vlms import colored_photo, pretrain_with_named_slots, tiny_blip2


@pytest.mark.parametrize("model", ["toy-llava", "toy-blip2"])
def test_learned_concept_is_named_exactly_when_its_head_fires(model):
    vlm = myvlm.load(model)
    data = concept_data(n_concepts=1, seed=0)[0]
    identifier = data.concept.identifier
    images = [example.image for example in data.train]
    result = vlm.learn(identifier, identifier, images, [[example.caption] for example in data.train], progress=False)
    assert result.steps_done == 100 and result.stopped_early is None
    rng = np.random.default_rng(1)
    views = images + [augment(image, rng) for image in images]
    switched_on = [c.text for c in vlm.caption(views, [[identifier]] * len(views))]
    switched_off = [c.text for c in vlm.caption(views, [[]] * len(views))]
    assert all(identifier in text for text in switched_on), switched_on
    assert not any(identifier in text for text in switched_off), switched_off


def test_toy_blip2_learns_a_concept_on_which_the_official_single_start_stalls():
    """Ruby (concept 5 of seed 0) on toy-blip2: from the official single start (training seed 0) she is never named on
    unseen photos (measured 0.0); the best of the backend's 3 starts names her (1.0; benchmarks/RESULTS.md)."""
    vlm = myvlm.load("toy-blip2")
    data = concept_data(n_concepts=6, seed=0)[5]
    identifier = data.concept.identifier
    images = [example.image for example in data.train]
    captions = [[example.caption] for example in data.train]
    unseen = [example.image for example in data.positives[:10]]
    named = {}
    for starts in (1, None):
        result = vlm.learn(identifier, identifier, images, captions, TrainingConfig(starts=starts), progress=False)
        assert result.steps_done == 100 and len(result.losses) == 100
        texts = [c.text for c in vlm.caption(unseen, [[identifier]] * len(unseen))]
        named[starts] = sum(identifier in text for text in texts) / len(texts)
    assert named[None] >= 0.9 and named[1] <= 0.2, named


def test_blip2_flan_t5_learns_the_identifier_too():
    """No packaged toy model has a Flan-T5 LM, so a tiny one is pretrained here the way toy-blip2 is."""
    vlm = pretrain_with_named_slots(tiny_blip2("t5"))
    images = [colored_photo(color, 999 + i) for i, color in enumerate(["red", "blue", "green", "red"])]
    result = vlm.learn("bobby", "Bobby", images, [["Bobby is on the sofa ."]] * 4, progress=False)
    assert result.steps_done == 100 and result.stopped_early is None
    views = images + [augment(image, np.random.default_rng(5)) for image in images]
    switched_on = [c.text for c in vlm.caption(views, [["bobby"]] * len(views), max_new_tokens=8)]
    switched_off = [c.text for c in vlm.caption(views, [[]] * len(views), max_new_tokens=8)]
    assert all("Bobby" in text for text in switched_on), switched_on
    assert not any("Bobby" in text for text in switched_off), switched_off
