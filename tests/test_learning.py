"""Learning a concept end to end on the packaged toy VLMs (real HF LLaVA / BLIP-2-OPT classes, pretrained on toyworld):
after 100 steps on 4 photos the model names the concept on those photos and on augmented views of them, and only
when the concept is switched on."""

from __future__ import annotations

import numpy as np
import pytest

import myvlm
from myvlm.augment import augment
from myvlm.toyworld import concept_data


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
