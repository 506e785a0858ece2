"""LLaVA-1.5 (the reference sequence family), saved with its processor and a chat-free prompt."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from families import tiny_text, tiny_vision, word_tokenizer

DYNAMIC_RESOLUTION = False
SIZE, PATCH = 32, 8


def build(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(
        ["<pad>", "<s>", "</s>", "<image>"],
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    vision = CLIPVisionConfig(**tiny_vision(image_size=SIZE, patch_size=PATCH))
    text = LlamaConfig(**tiny_text(tokenizer))
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>")
    )
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


BUILDERS = {"llava": build}
