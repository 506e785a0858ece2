"""Idefics3 / SmolVLM specifics: crops plus a global view per image, one concept token per image at the end of the
global block, each sample's crops kept its own, the image-only SmolVLM processor, and the tower for object heads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SmolVLMProcessor
from transformers.utils import is_torchvision_available

import myvlm
from families.idefics3 import BUILDERS, CROP, LONGEST, PATCH
from myvlm.backends.idefics3 import ImageOnlySmolVLMProcessor, SmolVLMBackend

TOKENS_PER_CROP = (CROP // PATCH) ** 2 // 4  # pixel shuffle with scale factor 2


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vlm(request, tmp_path_factory):
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param), 0)
    return myvlm.load(str(folder))


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def crops(width: int, height: int) -> int:
    """Crops of a photo plus its global view, as the processor splits it."""
    scale = LONGEST / max(width, height)
    rows, cols = (-(-round(side * scale) // CROP) for side in (height, width))
    return rows * cols + 1


def test_concept_ends_the_global_block_once_per_image_whatever_the_crops(vlm):
    backend, tokens = vlm.backend, vlm.backend.tokenizer.convert_ids_to_tokens
    images, counts = [photo(48, 48), photo(96, 64), photo(96, 64)], [1, 2, 0]
    batch = backend.encode(images, [backend.prompt("caption", ["Bobby"])] * 3, counts)
    for row, image, positions, k in zip(
        batch.inputs["input_ids"], images, batch.concept_positions, counts, strict=True
    ):
        words = tokens(row.tolist())
        tags = [i for i, w in enumerate(words) if w == "<global-img>" or w.startswith("<row_")]
        runs = [next(j for j in range(tag + 1, len(words)) if words[j] != "<image>") - tag - 1 for tag in tags]
        assert len(tags) == crops(*image.size) > 1  # the photo is split: crops exist
        assert words[tags[-1]] == "<global-img>"
        assert runs == [TOKENS_PER_CROP] * (len(tags) - 1) + [TOKENS_PER_CROP + k]  # concepts join the global block
        end = tags[-1] + 1 + TOKENS_PER_CROP
        assert positions == list(range(end, end + k))
        assert words[end + k] == "<fake_token_around_image>"


def test_each_sample_keeps_its_own_crops_in_a_mixed_batch(vlm):
    backend = vlm.backend
    images = [photo(48, 48, seed=1), photo(96, 64, seed=2)]
    inputs = backend.pixel_inputs(images)
    assert inputs["pixel_values"].shape[:2] == (2, crops(48, 48))  # padded to the larger crop count
    together = backend.split_images(backend.image_features(inputs))
    assert [len(block) for block in together] == [crops(*image.size) * TOKENS_PER_CROP for image in images]
    for image, block in zip(images, together, strict=True):
        alone = backend.split_images(backend.image_features(backend.pixel_inputs([image])))[0]
        torch.testing.assert_close(block, alone, rtol=1e-5, atol=1e-5)


def test_prompt_comes_from_the_chat_template_and_answers_end_the_turn(vlm):
    backend = vlm.backend
    prompt = backend.prompt("caption", ["Bobby"])
    assert prompt.endswith("User:<image>Please caption this image of Bobby.<end_of_utterance>\nAssistant:")
    assert backend.prompt("vqa", question="What is Bobby doing ?").count("<image>") == 1
    answer = backend.answer_ids(prompt, "Bobby is on the left .")
    assert answer[-1] == backend.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert answer[:-1] == backend.tokenizer("Bobby is on the left .", add_special_tokens=False).input_ids


def test_vision_tower_gives_patch_features_for_object_heads(vlm):
    patches = vlm.backend.tower_patches([photo(48, 48), photo(96, 64)])
    assert patches.shape == (2, (CROP // PATCH) ** 2, vlm.backend.tower_width)
    regions = vlm.vision_encoder.embed_regions([photo(48, 48)])
    assert regions.shape == (1, 1 + (CROP // PATCH) ** 2, vlm.backend.tower_width)


def test_smolvlm_processor_loads_image_only_without_torchvision(tmp_path):
    folder = BUILDERS["smolvlm"](tmp_path / "smolvlm", 0)
    stock = SmolVLMProcessor if is_torchvision_available() else ImageOnlySmolVLMProcessor
    assert type(SmolVLMBackend.load_processor(str(folder))) is stock
    settings = json.loads((folder / "processor_config.json").read_text())
    assert settings["processor_class"] == "SmolVLMProcessor"
    # A folder saved where torchvision exists also holds the video processor's settings; the hub's older layout keeps
    # the image processor in preprocessor_config.json. Both load, and process images and text the same.
    reference = SmolVLMBackend.load_processor(str(folder))
    image, text = (
        photo(96, 64),
        reference.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is Bobby ?"}]}],
            add_generation_prompt=True,
        ),
    )
    expected = reference(images=[[image]], text=[text], return_tensors="pt")
    video = {"video_processor": {"video_processor_type": "SmolVLMVideoProcessor", "num_frames": 64, "fps": 1}}
    (folder / "processor_config.json").write_text(json.dumps({**settings, **video}))
    layouts = [SmolVLMBackend.load_processor(str(folder))]
    image_settings = {**settings.pop("image_processor"), "processor_class": "SmolVLMProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(settings))
    (folder / "preprocessor_config.json").write_text(json.dumps(image_settings))
    layouts.append(SmolVLMBackend.load_processor(str(folder)))
    for processor in layouts:
        assert processor.image_seq_len == TOKENS_PER_CROP and processor.chat_template == reference.chat_template
        got = processor(images=[[image]], text=[text], return_tensors="pt")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[key], expected[key]) for key in expected)
