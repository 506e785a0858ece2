"""LLaVA-NeXT / LLaVA-OneVision specifics: anyres token counts, the concept after packing once per image, prompts
and answer ends from the chat template, OneVision's image-only processor without torchvision."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaOnevisionProcessor

import myvlm
from families.llava_next import BUILDERS, PATCH, TILE
from myvlm.backends.llava_next import ImageOnlyOnevisionProcessor

SIZES = [(48, 48), (30, 64), (64, 24), (40, 64)]  # (width, height): four tile grids, four token counts
TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vlm(request, tmp_path_factory):
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param), 0)
    return myvlm.load(str(folder))


def images() -> list[Image.Image]:
    return [Image.new("RGB", size, color) for size, color in zip(SIZES, ("red", "blue", "green", "gray"), strict=True)]


def test_token_count_follows_aspect_ratio_and_concepts_extend_the_packed_block(vlm):
    backend = vlm.backend
    prompt = backend.prompt("caption", ["Bobby"])
    batch = backend.encode(images(), [prompt] * 4, [1, 0, 2, 1])
    packed = [len(block) for block in backend.split_images(backend.image_features(backend.pixel_inputs(images())))]
    assert len(set(packed)) >= 3  # aspect ratios change the tile grid, so the count
    counts = (batch.inputs["input_ids"] == backend.image_token_id).sum(1).tolist()
    assert counts == [n + k for n, k in zip(packed, [1, 0, 2, 1], strict=True)]


def test_concept_follows_each_images_packed_block_once(vlm):
    """The language model sees, at the concept slots, the scaled concept vectors, right after the image's last
    packed token (the image_newline that ends its tile rows), and nothing changes inside the block."""
    backend, width = vlm.backend, vlm.concept_width
    prompt = backend.prompt("vqa", question="What is the dog doing ?")
    batch = backend.encode(images(), [prompt] * 4, [1, 2, 0, 1])
    blocks = backend.split_images(backend.image_features(backend.pixel_inputs(images())))
    vectors = [torch.randn(k, width) for k in (1, 2, 0, 1)]
    seen = {}
    hook = backend.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad(), backend.inject(vectors, batch=batch):
            vlm.model(**backend.model_inputs(batch))
    finally:
        hook.remove()
    newline = backend.model.model.image_newline
    for row, (positions, block, vecs) in enumerate(zip(batch.concept_positions, blocks, vectors, strict=True)):
        image_rows = (batch.inputs["input_ids"][row] == backend.image_token_id).nonzero().flatten().tolist()
        block_rows = [r for r in image_rows if r not in positions]
        torch.testing.assert_close(seen["embeds"][row, block_rows], block)
        assert torch.equal(block[-1], newline.to(block.dtype))
        if positions:
            assert positions[0] == block_rows[-1] + 1
            expected = F.normalize(vecs, dim=-1) * block.norm(dim=-1).mean()
            torch.testing.assert_close(seen["embeds"][row, positions], expected)


def test_prompt_and_answer_end_come_from_the_chat_template(vlm):
    backend = vlm.backend
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the dog ?"}]}]
    expected = vlm.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert backend.prompt("vqa", question="Where is the dog ?") == expected
    end = {"llava_next": "</s>", "llava_onevision": "<|im_end|>"}[vlm.model.config.model_type]
    assert backend.answer_end_id == backend.tokenizer.convert_tokens_to_ids(end)
    assert backend.answer_ids(expected, "on the sofa .")[-1] == backend.answer_end_id


def test_llava_next_without_chat_template_takes_llava_prompt(tmp_path):
    folder = BUILDERS["llava_next"](tmp_path, 0)
    (folder / "chat_template.jinja").unlink()
    backend = myvlm.load(str(folder)).backend
    assert backend.prompt("caption") == "USER: <image>\nPlease caption this image. ASSISTANT:"
    assert backend.answer_end_id == backend.tokenizer.eos_token_id


@pytest.mark.skipif(TORCHVISION, reason="the image-only path is for machines without torchvision")
def test_onevision_loads_image_only_without_torchvision(tmp_path):
    folder = BUILDERS["llava_onevision"](tmp_path, 0)
    with pytest.raises(ImportError, match="Torchvision"):
        LlavaOnevisionProcessor.from_pretrained(folder)  # why the image-only path exists
    processor = myvlm.load(str(folder)).processor
    assert isinstance(processor, ImageOnlyOnevisionProcessor)
    assert (processor.num_image_tokens, processor.vision_feature_select_strategy) == ((TILE // PATCH) ** 2, "full")
    assert processor.chat_template and "<|im_start|>" in processor.chat_template


def test_cached_step_equals_full_step_across_aspect_ratios(vlm):
    backend, width = vlm.backend, vlm.concept_width
    prompts = [backend.prompt("caption", ["Bobby"])] * 4
    batch = backend.encode(images(), prompts, [1, 1, 2, 1], targets=["Bobby is on the sofa ."] * 4)
    vectors = [torch.randn(k, width, requires_grad=True) for k in (1, 1, 2, 1)]

    def step(cached: bool):
        with backend.inject(vectors, batch=batch, record_attention=True):
            loss = backend.cached_loss(batch, backend.cache_views(images())) if cached else backend.loss(batch)
            total = loss + backend.regularizer("caption")
        grads = torch.autograd.grad(total, vectors)
        return loss.detach(), total.detach(), grads

    full, cached = step(False), step(True)
    torch.testing.assert_close(cached[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached[1], full[1], rtol=1e-5, atol=1e-5)
    for got, want in zip(cached[2], full[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_tower_patches_are_the_base_views_tokens(vlm):
    patches = vlm.backend.tower_patches(images()[:2])
    assert patches.shape == (2, (TILE // PATCH) ** 2, vlm.backend.tower_width)


def test_a_chat_template_kept_only_by_the_tokenizer_is_the_prompt(tmp_path):
    """Older folders keep the chat template in tokenizer_config.json alone: it is used, not LLaVA-1.5's prompt."""
    import json

    folder = BUILDERS["llava_next"](tmp_path / "llava_next", 0)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": template}))
    backend = myvlm.load(str(folder)).backend
    assert backend.prompt("caption", ["Bobby"]).endswith("[INST] <image>\nPlease caption this image of Bobby. [/INST]")
    assert backend.answer_end_id == backend.tokenizer.eos_token_id
