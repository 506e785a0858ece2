"""Tiny Idefics3 and SmolVLM models: a SigLIP-style tower, pixel-shuffle connector and Llama LM, saved with their real
processor classes. Images are split into 16 px crops plus a global view (one token each after pixel shuffle), so token
counts follow the image's shape: a square photo gives 3×3 crops + global (10 image tokens), a 3:2 one 2×3 + global (7).
Few image tokens per crop keep the learning proof's pretraining within its 300 steps (with 4 per crop, 40 per photo,
the tiny LM had not yet learned to copy the prompt's name)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    LlamaConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from families import tiny_vision, word_tokenizer
from myvlm.backends.idefics3 import ImageOnlySmolVLMProcessor

DYNAMIC_RESOLUTION = True  # image splitting: the crop grid, so the token count, follows the image's shape
CROP, LONGEST, PATCH = 16, 48, 8  # crops of 16 px (one token each); images resized to a 48 px longest edge
IMAGE_SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
GRID = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
# The families' own chat templates (Idefics3-8B-Llama3's, and SmolVLM's with <|im_start|>).
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_TEMPLATE = IDEFICS3_TEMPLATE.replace("<|begin_of_text|>", "<|im_start|>")


def _configs(bos: int, eos: int, pad: int, image: int, vocab: int, vision_config_class):
    vision = vision_config_class(**tiny_vision(image_size=CROP, patch_size=PATCH))
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    return {"vision_config": vision, "text_config": text, "scale_factor": 2, "image_token_id": image}


def _build(folder: Path, seed: int, smolvlm: bool) -> Path:
    start, end = ("<|im_start|>", "<|im_end|>") if smolvlm else ("<|begin_of_text|>", "<|end_of_text|>")
    tokenizer = word_tokenizer(
        ["<pad>", start, end, *IMAGE_SPECIALS, *GRID],
        pad_token="<pad>",
        bos_token=start,
        eos_token=end,
    )
    ids = tokenizer.convert_tokens_to_ids
    vision_config_class = SmolVLMVisionConfig if smolvlm else Idefics3VisionConfig
    configs = _configs(ids(start), ids(end), ids("<pad>"), ids("<image>"), len(tokenizer), vision_config_class)
    torch.manual_seed(seed)
    sizes = {"size": {"longest_edge": LONGEST}, "max_image_size": {"longest_edge": CROP}, "do_image_splitting": True}
    image_seq_len = (CROP // PATCH) ** 2 // 4
    if smolvlm:
        model = SmolVLMForConditionalGeneration(SmolVLMConfig(**configs))
        # The stock class cannot be built without torchvision (its video processor): save the image-only one under
        # the stock class's name, the folder a stock save makes minus the video processor's settings.
        processor = ImageOnlySmolVLMProcessor(
            SmolVLMImageProcessorPil(**sizes), tokenizer, image_seq_len=image_seq_len, chat_template=SMOLVLM_TEMPLATE
        )
    else:
        model = Idefics3ForConditionalGeneration(Idefics3Config(**configs))
        processor = Idefics3Processor(
            Idefics3ImageProcessorPil(**sizes), tokenizer, image_seq_len=image_seq_len, chat_template=IDEFICS3_TEMPLATE
        )
    # A trained connector puts image tokens on the scale of word embeddings (HF's random one: ~12× larger, which the
    # tiny LM's pretraining in the learning proof cannot get past).
    with torch.no_grad():
        projection = model.model.connector.modality_projection.proj.weight
        projection.mul_(model.get_input_embeddings().weight.norm(dim=-1).mean() / 2 / _image_token_norm(model))
    # As the released checkpoints' generation configs: a reply stops at the end of the turn.
    model.generation_config.eos_token_id = [ids(end), ids("<end_of_utterance>")]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if smolvlm:
        settings = folder / "processor_config.json"
        settings.write_text(json.dumps({**json.loads(settings.read_text()), "processor_class": "SmolVLMProcessor"}))
    return folder


def _image_token_norm(model) -> torch.Tensor:
    """Mean norm of the connector's tokens for random pixels."""
    pixels = torch.randn(1, 2, 3, CROP, CROP, generator=torch.Generator().manual_seed(0))
    return model.model.get_image_features(pixels).pooler_output[0].norm(dim=-1).mean()


def build_idefics3(folder: Path, seed: int) -> Path:
    return _build(folder, seed, smolvlm=False)


def build_smolvlm(folder: Path, seed: int) -> Path:
    return _build(folder, seed, smolvlm=True)


BUILDERS = {"idefics3": build_idefics3, "smolvlm": build_smolvlm}
