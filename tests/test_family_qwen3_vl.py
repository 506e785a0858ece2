"""Qwen3-VL specifics: the concept's zero deepstack row, its M-RoPE positions in training, cached training and
generation (rope_deltas), and the image-only processor and tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import myvlm
from families.qwen3_vl import BUILDERS
from myvlm.backends.base import CAPTION


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return myvlm.load(str(BUILDERS["qwen3_vl"](tmp_path_factory.mktemp("qwen3_vl"), 0)))


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def vectors(vlm, counts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(k, vlm.concept_width, generator=generator) for k in counts]


def language_model_inputs(vlm, batch, inserted) -> dict:
    """The deepstack inputs the language model gets in one forward over `batch` with `inserted` concepts."""
    seen = {}
    handle = vlm.backend.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    try:
        with torch.no_grad(), vlm.backend.inject(inserted, batch=batch):
            vlm.model(**vlm.backend.model_inputs(batch))
    finally:
        handle.remove()
    return {"mask": seen["visual_pos_masks"], "deepstack": seen["deepstack_visual_embeds"]}


def test_the_concept_slot_gets_a_zero_deepstack_row_and_the_image_keeps_its_own(vlm):
    backend = vlm.backend
    image, prompt = photo(64, 48, 1), backend.prompt(CAPTION, ["Bobby"])
    plain = language_model_inputs(vlm, backend.encode([image], [prompt], [0]), vectors(vlm, [0]))
    batch = backend.encode([image], [prompt], [1])
    ours = language_model_inputs(vlm, batch, vectors(vlm, [1]))
    slot = batch.concept_positions[0][0]
    assert torch.equal(ours["mask"], batch.inputs["input_ids"] == backend.image_token_id) and ours["mask"][0, slot]
    assert len(ours["deepstack"]) == len(vlm.model.config.vision_config.deepstack_visual_indexes) == 2
    for with_concept, without in zip(ours["deepstack"], plain["deepstack"], strict=True):
        assert torch.equal(with_concept[:-1], without) and without.abs().sum() > 0  # the image's rows, unchanged
        assert not with_concept[-1].any()  # the concept's row (the image's last slot) is zero


def test_concept_takes_the_next_text_position_after_its_image_grid(vlm):
    backend = vlm.backend
    image, prompt = photo(64, 48, 1), backend.prompt(CAPTION, ["Bobby"])
    plain = backend.encode([image], [prompt], [0], ["Bobby is on the sofa ."])
    with_concept = backend.encode([image], [prompt], [1], ["Bobby is on the sofa ."])
    before, after = backend.position_ids(plain.inputs)[:, 0], backend.position_ids(with_concept.inputs)[:, 0]
    slot = with_concept.concept_positions[0][0]
    assert with_concept.inputs["input_ids"][0, slot + 1] == vlm.model.config.vision_end_token_id
    assert torch.equal(after[:, :slot], before[:, :slot])
    assert after[:, slot].tolist() == [int(before[:, :slot].max()) + 1] * 3
    assert torch.equal(after[:, slot + 1 :], before[:, slot:] + 1)


def test_generation_continues_the_positions_training_uses(vlm):
    """Greedy decoding of a left-padded batch of two sizes with a concept: every step's logits (prefill with the
    deepstack rows, then decoding from rope_deltas) equal one full forward over prompt + answer, as training runs."""
    backend = vlm.backend
    images = [photo(32, 32, 2), photo(64, 48, 3)]
    batch = backend.encode(images, [backend.prompt(CAPTION, ["Bobby"]), backend.prompt(CAPTION)], [1, 0])
    inserted = vectors(vlm, [1, 0])
    with backend.inject(inserted, batch=batch):
        generated = vlm.model.generate(
            **backend.model_inputs(batch),
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    steps = torch.stack(generated.logits, dim=1)
    full = dict(backend.model_inputs(batch))
    new = generated.sequences[:, batch.inputs["input_ids"].shape[1] :]
    full["input_ids"] = generated.sequences
    full["attention_mask"] = torch.cat([full["attention_mask"], torch.ones_like(new)], dim=1)
    full["mm_token_type_ids"] = torch.cat([full["mm_token_type_ids"], torch.zeros_like(new)], dim=1)
    with torch.no_grad(), backend.inject(inserted, batch=batch):
        logits = vlm.model(**full, use_cache=False).logits[:, -new.shape[1] - 1 : -1]
    torch.testing.assert_close(steps, logits, atol=1e-4, rtol=1e-4)


def test_cached_training_equals_the_full_step_when_image_rows_fall_after_the_split(vlm):
    """Three sizes and concept counts 2, 0, 1: the larger images' last rows (with their deepstack rows) and all the
    concepts are in the suffix pass, the rest in the cached prefixes."""
    backend = vlm.backend
    images = [photo(32, 32, 4), photo(64, 48, 5), photo(48, 64, 6)]
    prompts = [backend.prompt(CAPTION, ["Bobby", "Alice"]), backend.prompt(CAPTION), backend.prompt(CAPTION, ["Bobby"])]
    targets = ["Bobby and Alice are on the sofa .", "a dog is on the grass .", "Bobby is on the table ."]
    counts = [2, 0, 1]
    results = []
    for cached in (False, True):
        inserted = [v.requires_grad_(True) for v in vectors(vlm, counts)]
        batch = backend.encode(images, prompts, counts, targets, with_pixels=not cached)
        with backend.inject(inserted, batch=batch, record_attention=True):
            loss = backend.cached_loss(batch, backend.cache_views(images)) if cached else backend.loss(batch)
            regularizer = backend.regularizer(CAPTION)
        (loss + regularizer).backward()
        results.append((loss.detach(), regularizer.detach(), inserted[0].grad, inserted[2].grad))
    for full, cached in zip(*results, strict=True):
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)


def test_image_only_processor_and_the_tower_for_heads(vlm):
    from transformers.utils import is_torchvision_available

    assert not is_torchvision_available()  # this machine: the image-only path is the one under test
    assert type(vlm.processor).__name__ == "Qwen3VLProcessor"
    assert getattr(vlm.processor, "video_processor", None) is None
    patches = vlm.backend.tower_patches([photo(32, 32, 7), photo(64, 48, 8)])
    assert patches.shape == (2, 64, vlm.backend.tower_width)  # 64x64 pixels in 8x8 patches, before merging
