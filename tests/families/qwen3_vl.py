"""A tiny random Qwen3-VL folder: the real model class with deepstack (tower layers 0 and 1 feed the language model's
first two layers), its real processor class (image-only where torchvision is missing, as myvlm loads it), a
word-level tokenizer with Qwen's special tokens and Qwen3-VL-Instruct's chat template (images only)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)

from families import tiny_text, word_tokenizer
from families.qwen2_vl import MERGE, PATCH, SPECIALS, save

DYNAMIC_RESOLUTION = True
# The learning proof's pretraining on 8 toy names: with 28, whether the tiny model learns to say the prompt's name for a
# new concept vector depends on the seed (at seed 0 it names a pretrained neighbour on 3 of 8 photos); with 8 it names
# the concept on every photo at seeds 0, 1 and 2.
PRETRAIN_NAMES = {"qwen3_vl": 8, "qwen3_vl_moe": 8}
# Qwen3-VL-Instruct's chat template without tools, videos and reasoning turns: unlike Qwen2-VL's, no default system
# message; images are <|vision_start|><|image_pad|><|vision_end|> where the message has them.
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}{%- else %}"
    "{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'user' or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _build(folder: Path, seed: int, config_class, model_class, **text_fields) -> Path:
    torch.manual_seed(seed)
    tokens = word_tokenizer(SPECIALS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    ids = tokens.convert_tokens_to_ids
    # head_dim 16: 8 rotary frequencies, interleaved t,h,w,t,... by mrope_section [4, 2, 2] (the real one: [24, 20, 20])
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    config = config_class(
        vision_config=dict(
            vision,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
        ),
        text_config=tiny_text(tokens, head_dim=16, rope_parameters=rope, **text_fields),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return save(model_class(config), tokens, Qwen3VLProcessor, folder, CHAT_TEMPLATE)


def build_qwen3_vl(folder: Path, seed: int) -> Path:
    return _build(folder, seed, Qwen3VLConfig, Qwen3VLForConditionalGeneration)


def build_qwen3_vl_moe(folder: Path, seed: int) -> Path:
    """Its language model's MLPs are 4 experts, 2 per token."""
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    return _build(folder, seed, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, **experts)


BUILDERS = {"qwen3_vl": build_qwen3_vl, "qwen3_vl_moe": build_qwen3_vl_moe}
