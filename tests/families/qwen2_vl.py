"""Tiny random Qwen2-VL and Qwen2.5-VL folders: the real model classes, their processors (image-only where torchvision
is missing, as myvlm loads them), a word-level tokenizer with Qwen's special tokens and Qwen's own chat template."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from families import word_tokenizer
from myvlm.backends.qwen2_vl import image_only

DYNAMIC_RESOLUTION = True
# The learning proof's pretraining: the tiny Qwen2-VL learns 4 toy names in 300 steps where 28 stay a blur.
PRETRAIN_NAMES = {"qwen2_vl": 4}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
SPECIALS += ["<|video_pad|>"]
# Qwen2-VL-Instruct's chat template (images only).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH, MERGE = 8, 2


def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level over the toy world's words, with Qwen's special tokens, pad and end-of-turn as Qwen's."""
    return word_tokenizer(SPECIALS, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def save(model, tokens: PreTrainedTokenizerFast, processor_class, folder: Path, chat_template=CHAT_TEMPLATE) -> Path:
    """The model and its Qwen processor (image-only where torchvision is missing) with this chat template."""
    model.generation_config.eos_token_id = tokens.eos_token_id
    model.generation_config.pad_token_id = tokens.pad_token_id
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=32 * 32, max_pixels=64 * 64, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2
    )
    processor = image_only(processor_class)(image_processor=image_processor, tokenizer=tokens)
    processor.chat_template = chat_template
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _text(tokens: PreTrainedTokenizerFast) -> dict:
    return dict(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=tokens.pad_token_id,
        bos_token_id=tokens.pad_token_id,
        eos_token_id=tokens.eos_token_id,
    )


def _ids(tokens: PreTrainedTokenizerFast) -> dict:
    ids = tokens.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
        "tie_word_embeddings": False,
    }


def build_qwen2_vl(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    tokens = tokenizer()
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=PATCH)
    config = Qwen2VLConfig(
        vision_config=dict(vision, spatial_merge_size=MERGE, temporal_patch_size=2),
        text_config=_text(tokens),
        **_ids(tokens),
    )
    return save(Qwen2VLForConditionalGeneration(config), tokens, Qwen2VLProcessor, folder)


def build_qwen2_5_vl(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    tokens = tokenizer()
    vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=PATCH)
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            vision, spatial_merge_size=MERGE, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1]
        ),
        text_config=_text(tokens),
        **_ids(tokens),
    )
    return save(Qwen2_5_VLForConditionalGeneration(config), tokens, Qwen2_5_VLProcessor, folder)


BUILDERS = {"qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl}
