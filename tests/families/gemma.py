"""Tiny random PaliGemma and Gemma 3 folders: the real HF model and processor classes, a word-level tokenizer with
each family's special tokens (PaliGemma's processor adds its 1,152 <loc>/<seg> tokens itself), Gemma 3's real chat
template, untied embeddings and, for Gemma 3, a random `mm_input_projection_weight` (HF's init zeroes it)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from families import tiny_text, tiny_vision, word_tokenizer

DYNAMIC_RESOLUTION = False
IMAGE_SIZE, PATCH = 32, 8

# Gemma 3's chat template as released (google/gemma-3-*-it), `{{ '\n' }}`-safe under trim_blocks.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


def _vision() -> SiglipVisionConfig:
    return SiglipVisionConfig(**tiny_vision(image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False))


def build_paligemma(folder: Path, seed: int, text_model: str = "gemma") -> Path:
    """PaliGemma on Gemma; `text_model="gemma2"` builds PaliGemma 2 (softcapped attention, sliding-window layers)."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<image>"],
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = (IMAGE_SIZE // PATCH) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <loc>/<seg>
    gemma2 = {"sliding_window": 12, "layer_types": ["sliding_attention", "full_attention"], "query_pre_attn_scalar": 16}
    text = (Gemma2Config if text_model == "gemma2" else GemmaConfig)(
        **(gemma2 if text_model == "gemma2" else {}),
        **tiny_text(tokenizer, vocab_size=len(processor.tokenizer), num_key_value_heads=1, head_dim=16),
    )
    config = PaliGemmaConfig(
        vision_config=_vision(),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=64,
        hidden_size=64,
        vocab_size=len(processor.tokenizer),
        tie_word_embeddings=False,
    )
    model = PaliGemmaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def build_gemma3(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    images = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = word_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", *images.values()],
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens=images,
    )
    tokens_per_image = 4  # a square: the projector average-pools the 4x4 patch grid to 2x2
    text = Gemma3TextConfig(
        **tiny_text(tokenizer, head_dim=16, query_pre_attn_scalar=16),
        sliding_window=12,  # shorter than a prompt, so the sliding layer's window really cuts
        layer_types=["sliding_attention", "full_attention"],
    )
    config = Gemma3Config(
        vision_config=_vision(),
        text_config=text,
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        tie_word_embeddings=False,
    )
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # HF's init zeroes the projection: the model would not see its images
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


BUILDERS = {"paligemma": build_paligemma, "gemma3": build_gemma3}
