"""Models and data for the speed benchmarks: the toy models when packaged, and random-init models with the real token
counts (LLaVA-1.5: 576 image tokens; BLIP-2: 257 vision tokens, 32 queries) scaled down in width and depth.

Widths and depths keep the real models' proportions (vision encoder vs LLM, LM head vs body), so the share of the
work that caching removes is about the real one. `--full` gives the real LLaVA-1.5-7B / BLIP-2 OPT-2.7B shapes
(random weights) for a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
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
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import myvlm
from myvlm.errors import MyVLMError
from myvlm.model import PersonalizedVLM, resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_vlms import make_tokenizer, photos  # noqa: E402

TOY = ("toy-llava", "toy-blip2")
# name -> (scaled-down CPU size, real size): width, depth, heads, FFN, vocab of the LLM; width, depth of the encoder.
# Widths are large enough that arithmetic, not per-operation overhead, dominates each step, as on real hardware.
# LLaVA on CPU: LLM 4096 x 32 -> 256 x 4 (LLaMA's FFN ratio), CLIP ViT-L 1024 x 24 -> 64 x 2 at the real 336 px / 14.
# BLIP-2 on CPU: every width / 4 and every depth / 8 (ViT-g 1408 x 39 -> 352 x 5, Q-Former 768 x 12 -> 192 x 2,
# OPT-2.7B 2560 x 32 -> 640 x 4), vocabulary so the LM head keeps its ~5 % share of the LLM's work.
SHAPES = {
    "llava-576": {
        "cpu": dict(width=256, depth=4, heads=4, ffn=688, vocab=1000, v_width=64, v_depth=2),
        "full": dict(width=4096, depth=32, heads=32, ffn=11008, vocab=32064, v_width=1024, v_depth=24),
    },
    "blip2-257": {
        "cpu": dict(width=640, depth=4, heads=8, ffn=2560, vocab=1600, v_width=352, v_depth=5),
        "full": dict(width=2560, depth=32, heads=32, ffn=10240, vocab=50272, v_width=1408, v_depth=39),
    },
}


def available(name: str) -> bool:
    """Random-init shapes always are; toy models once packaged (`myvlm toyworld build`)."""
    try:
        resolve_model(name)
    except MyVLMError:
        return False
    return True


def build(name: str, full: bool = False, dtype: torch.dtype | None = None, device: str = "cpu") -> PersonalizedVLM:
    if name in TOY:
        return myvlm.load(name, dtype=dtype, device=device)
    torch.manual_seed(0)
    size = SHAPES[name]["full" if full else "cpu"]
    maker = _llava if name.startswith("llava") else _blip2
    vlm = maker(**size)
    if dtype is not None or device != "cpu":
        vlm.model.to(device=device, dtype=dtype)
    return vlm


def _llava(width, depth, heads, ffn, vocab, v_width, v_depth) -> PersonalizedVLM:
    vision = CLIPVisionConfig(
        hidden_size=v_width,
        image_size=336,
        patch_size=14,
        num_hidden_layers=v_depth,
        num_attention_heads=max(v_width // 64, 1),
        intermediate_size=4 * v_width,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=ffn,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=4))
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=make_tokenizer(True),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return PersonalizedVLM(model, processor, "llava-576")


def _blip2(width, depth, heads, ffn, vocab, v_width, v_depth) -> PersonalizedVLM:
    text = OPTConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=depth,
        ffn_dim=ffn,
        num_attention_heads=heads,
        word_embed_proj_dim=width,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    vision = dict(num_attention_heads=max(v_width // 88, 1), intermediate_size=4 * v_width)
    qformer = dict(
        hidden_size=768 * width // 2560,
        num_hidden_layers=max(12 * depth // 32, 2),
        num_attention_heads=max(12 * width // 2560, 1),
        intermediate_size=3072 * width // 2560,
    )
    return blip2_model(text, v_width, v_depth, vision, qformer, "blip2-257")


def blip2_model(text_config, v_width: int, v_depth: int, vision: dict, qformer: dict, model_id: str) -> PersonalizedVLM:
    """A random BLIP-2 (224 px, patch 14, 32 queries) around this language model config, with the tiny tokenizer;
    `vision` / `qformer`: the rest of their configs' sizes."""
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=v_width, image_size=224, patch_size=14, num_hidden_layers=v_depth, **vision
        ),
        qformer_config=Blip2QFormerConfig(encoder_hidden_size=v_width, **qformer),
        text_config=text_config,
        num_query_tokens=32,
        image_token_id=4,
    )
    model = Blip2ForConditionalGeneration(config)
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": 224, "width": 224}),
        tokenizer=make_tokenizer(False),
        num_query_tokens=32,
    )
    return PersonalizedVLM(model, processor, model_id)


def concept_task(vlm: PersonalizedVLM, name: str):
    """(train images, captions per image, identifier, held-out positives or None): toy-world data for toy models,
    random images with fixed captions otherwise (a random-init model cannot say anything, so no recall)."""
    if name in TOY:
        from myvlm.toyworld import concept_data

        data = concept_data(n_concepts=1, seed=0)[0]
        return (
            [e.image for e in data.train],
            [[e.caption] for e in data.train],
            data.concept.identifier,
            [e.image for e in data.positives],
        )
    captions = [
        ["Bobby is sleeping on the sofa ."],
        ["Bobby is on the grass ."],
        ["Bobby is on the red table ."],
        ["a dog is on the sofa and Bobby is sitting ."],
    ]
    return photos(4, seed=1, size=400), captions, "Bobby", None


def recall(vlm: PersonalizedVLM, concept: str, identifier: str, positives) -> float | None:
    """Share of held-out concept images whose caption (concept injected) names the identifier."""
    if positives is None:
        return None
    captions = vlm.caption(positives, [[concept]] * len(positives), max_new_tokens=24)
    return sum(identifier in c.text for c in captions) / len(captions)


def available_models(names):
    """The requested models that can be built here, saying which are skipped."""
    for name in names:
        if available(name):
            yield name
        else:
            print(f"{name}: not packaged here, skipped")


def add_shape_arguments(parser) -> None:
    """The options both speed benchmarks share: where to run, in which dtype, at which size, and the JSON output."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--full", action="store_true", help="real LLaVA-1.5-7B / BLIP-2 OPT-2.7B shapes (GPU)")
    parser.add_argument("--json", type=str, help="write the rows as a JSON list to this file")
