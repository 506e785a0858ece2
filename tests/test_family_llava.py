"""LLaVA-1.5 on folders as outsiders bring them: no pad token (as the released Llama tokenizers), missing files."""

from __future__ import annotations

import json

import pytest
import torch

import myvlm
from families.llava import build
from myvlm.toyworld import render_scene, sample_scene


def test_a_tokenizer_without_pad_token_trains_and_captions_batches(tmp_path):
    folder = build(tmp_path / "llava", 0)
    settings = folder / "tokenizer_config.json"
    saved = json.loads(settings.read_text())
    saved.pop("pad_token")
    settings.write_text(json.dumps(saved))
    vlm = myvlm.load(str(folder))
    assert vlm.processor.tokenizer.pad_token == vlm.processor.tokenizer.eos_token  # batches pad with EOS, masked out
    images = [render_scene(sample_scene(i)) for i in range(2)]
    captions = [["Bobby is on the left ."], ["Bobby is a small red circle on the right ."]]  # two lengths: padding
    result = vlm.learn("bobby", "Bobby", images, captions, myvlm.TrainingConfig(steps=2, batch_size=2), progress=False)
    assert result.steps_done == 2
    assert len(vlm.caption(images, [["bobby"], []], max_new_tokens=4)) == 2


@pytest.mark.parametrize("missing", ["model.safetensors", "processor_config.json"])
def test_a_folder_missing_its_weights_or_image_processor_is_one_clear_error(tmp_path, missing):
    """Any family: an incomplete model folder fails at load in one MyVLMError line, not a transformers traceback."""
    folder = build(tmp_path / "llava", 0)
    (folder / missing).unlink()
    with pytest.raises(myvlm.MyVLMError, match="cannot load model") as error:
        myvlm.load(str(folder))
    assert "\n" not in str(error.value)


def test_a_siglip_tower_gives_heads_every_patch_of_its_grid(tmp_path):
    """LLaVA folders on a SigLIP tower (no CLS token, e.g. LLaVA-Interleave) lost their first patch, so the patches
    no longer made a square grid and object heads got no region boxes; CLIP's CLS is still dropped."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from families import tiny_text, tiny_vision, word_tokenizer

    tokenizer = word_tokenizer(["<pad>", "<s>", "</s>", "<image>"], pad_token="<pad>", eos_token="</s>")
    vision = SiglipVisionConfig(**tiny_vision(image_size=32, patch_size=8, vision_use_head=False))
    config = LlavaConfig(
        vision_config=vision,
        text_config=tiny_text(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
    )
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "siglip")
    LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
    ).save_pretrained(tmp_path / "siglip")
    images = [render_scene(sample_scene(i)) for i in range(2)]
    for folder in (tmp_path / "siglip", build(tmp_path / "clip", 0)):
        vlm = myvlm.load(str(folder))
        states = vlm.backend.vision_tower(pixel_values=vlm.backend.pixel_values(images)).last_hidden_state
        patches = vlm.backend.tower_patches(images)
        assert patches.shape[1] == 16 and torch.equal(patches, states[:, -16:])  # a 4x4 grid, CLIP's CLS dropped
        encoder = vlm.vision_encoder
        assert encoder.region_boxes_of(images, encoder.embed_regions(images).shape[1]).shape == (2, 17, 4)
