"""Tiny random-weight VLMs built offline from the real transformers classes, with a locally made tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from myvlm.model import PersonalizedVLM

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = (
    "USER ASSISTANT : Please caption this image of and . , ? a an the dog cat mug is on in sleeping sitting sofa "
    "grass table red blue green Bobby Alice Question Answer What Where doing color"
).split()
IMAGE_SIZE, PATCH = 32, 8


def make_tokenizer(image_token: bool) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    extra = {"extra_special_tokens": {"image_token": "<image>"}} if image_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", **extra
    )


def tiny_llava(seed: int = 0) -> PersonalizedVLM:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    text = LlamaConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=4))
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=make_tokenizer(True),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return PersonalizedVLM(model, processor, "tiny-llava")


def tiny_blip2(language_model: str = "opt", seed: int = 0) -> PersonalizedVLM:
    torch.manual_seed(seed)
    vocab_size = len(SPECIALS) + len(WORDS)
    if language_model == "opt":
        text = OPTConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    else:
        text = T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=3,
            decoder_start_token_id=0,
        )
    config = Blip2Config(
        vision_config=Blip2VisionConfig(  # its default initializer_range is 1e-10: a blind random tower
            initializer_range=0.02,
            hidden_size=48,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        qformer_config=Blip2QFormerConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            encoder_hidden_size=48,
        ),
        text_config=text,
        num_query_tokens=4,
        image_token_id=4,
    )
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # BLIP-2's init zeroes the query tokens; give them and the Q-Former a trained model's spread
        model.query_tokens.normal_(0, 1.0)
        for param in model.qformer.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3)
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=make_tokenizer(False),
        num_query_tokens=4,
    )
    return PersonalizedVLM(model, processor, f"tiny-blip2-{language_model}")


def save(vlm: PersonalizedVLM, folder: Path) -> Path:
    vlm.model.save_pretrained(folder)
    vlm.processor.save_pretrained(folder)
    return folder


def photos(n: int = 4, seed: int = 0, size: int = 48) -> list[Image.Image]:
    """Distinct random-texture images (the model is random, so any content works)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
