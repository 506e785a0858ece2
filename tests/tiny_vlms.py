"""Tiny random-weight VLMs built offline from the real transformers classes, with a locally made tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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


COLORS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 170, 30)}
PLACES = ("sofa", "grass", "table")


def colored_photo(color: str, seed: int, size: int = 48) -> Image.Image:
    """A noisy image whose dominant color its caption names."""
    rng = np.random.default_rng(seed)
    pixels = np.array(COLORS[color], dtype=np.float64) + rng.normal(0, 40, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def pretrain_with_named_slots(vlm: PersonalizedVLM, steps: int = 600, seed: int = 0) -> PersonalizedVLM:
    """Briefly pretrain the whole tiny VLM the way toy-blip2 is: caption colored photos ("a red dog is on the sofa ."),
    and when a named thing's vector sits in the concept slot (through the library's own hooks), name it instead
    ("Bobby is on the sofa ."). A random LM ignores its inputs; this one reads its visual tokens and can say a name,
    so a learned concept vector has a path to follow, as in a pretrained VLM."""
    from myvlm.augment import augment

    backend, width = vlm.backend, vlm.concept_width
    generator = torch.Generator().manual_seed(seed)
    codes = {name: F.normalize(torch.randn(width, generator=generator), dim=0) for name in ("Bobby", "Alice")}
    rng = np.random.default_rng(seed)
    vlm.model.train()
    vlm.model.requires_grad_(True)
    optimizer = torch.optim.Adam(vlm.model.parameters(), lr=3e-3)
    for step in range(steps):
        images, targets, slots = [], [], []
        for index in range(8):
            color, place = list(COLORS)[rng.integers(3)], PLACES[rng.integers(3)]
            image = colored_photo(color, seed * 100_000 + step * 8 + index)
            images.append(augment(image, rng) if rng.random() < 0.5 else image)
            name = [None, "Bobby", "Alice"][rng.integers(3)]
            if name is None:
                slots.append(torch.zeros(0, width))
                targets.append(f"a {color} dog is on the {place} .")
            else:  # the name's direction plus a random share of noise, as a learned vector starts out
                noise = torch.randn(width, generator=generator) * 2 * float(rng.random()) / width**0.5
                slots.append((codes[name] + noise)[None])
                targets.append(f"{name} is on the {place} .")
        prompts = [backend.prompt("caption", ["Bobby"] if len(s) else []) for s in slots]
        batch = backend.encode(images, prompts, [len(s) for s in slots], targets)
        with backend.inject(slots, batch=batch):
            loss = backend.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vlm.model.eval()
    vlm.model.requires_grad_(False)
    return vlm
