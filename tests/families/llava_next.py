"""Tiny LLaVA-NeXT and LLaVA-OneVision folders: random weights of the real classes, their real processors, a word-level
tokenizer with each family's special tokens and a chat template in the checkpoints' style."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

from families import tiny_text, tiny_vision, word_tokenizer
from myvlm.backends.llava_next import ImageOnlyOnevisionProcessor

DYNAMIC_RESOLUTION = True  # anyres: the tile grid, so the token count, follows the image's aspect ratio
TILE, PATCH = 32, 16  # a 32 px tower view in 16 px patches: 4 tokens per tile (few tokens: a tiny LM learns fast)
PINPOINTS = [[32, 32], [32, 64], [64, 32]]  # a square photo: base view + 1 tile; 2:1 ones: + 2 tiles
# LLaVA-v1.6-Mistral's template: images first, then the text, inside [INST] ... [/INST]; answers end with </s>.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}{{ ' [/INST]' }}"
    "{% else %}{% for item in message['content'] if item['type'] == 'text' %}{{ ' ' + item['text'] }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)
# LLaVA-OneVision-Qwen2's ChatML template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _untied(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # tied tiny models repeat their last token; give the head its own weights
        model.lm_head.weight.normal_(0, 0.02)
    return model


def build_llava_next(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(
        ["<pad>", "<s>", "</s>", "<image>", "[INST]", "[/INST]"],
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    vision = CLIPVisionConfig(**tiny_vision(image_size=TILE, patch_size=PATCH))
    text = LlamaConfig(**tiny_text(tokenizer))
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    model = _untied(LlavaNextForConditionalGeneration(config))
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        chat_template=MISTRAL_TEMPLATE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_llava_onevision(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    vision = SiglipVisionConfig(**tiny_vision(image_size=TILE, patch_size=PATCH))
    text = Qwen2Config(**tiny_text(tokenizer, bos_token_id=None))
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    model = _untied(LlavaOnevisionForConditionalGeneration(config))
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    # The stock processor cannot be built without torchvision: save the image-only one, then write what the stock one
    # saves (its class name, the video processor's settings) so that the stock loader reads the folder where it can.
    processor = ImageOnlyOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHATML_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for name in ("processor_config.json", "tokenizer_config.json"):
        saved = json.loads((folder / name).read_text())
        saved["processor_class"] = "LlavaOnevisionProcessor"
        if name == "processor_config.json":
            saved["video_processor"] = LlavaOnevisionVideoProcessor(size={"height": TILE, "width": TILE}).to_dict()
        (folder / name).write_text(json.dumps(saved, indent=2))
    return folder


BUILDERS: dict[str, Callable[[Path, int], Path]] = {
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
}
