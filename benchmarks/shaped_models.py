"""Models and data for the speed benchmarks: the toy models when packaged, and random-init models with the real token
counts (LLaVA-1.5: 576 image tokens; BLIP-2: 257 vision tokens, 32 queries; Qwen2-VL: a 448 x 448 photo -> 1024 patches
-> 256 merged tokens) scaled down in width and depth.

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
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import myvlm
from myvlm.backends.qwen2_vl import image_only
from myvlm.errors import MyVLMError
from myvlm.model import PersonalizedVLM, resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from families import qwen2_vl as tiny_qwen2_vl  # noqa: E402
from tiny_vlms import make_tokenizer, photos  # noqa: E402

TOY = ("toy-llava", "toy-blip2")
# name -> (scaled-down CPU size, real size): width, depth, heads, FFN, vocab of the LLM; width, depth of the encoder.
# Widths are large enough that arithmetic, not per-operation overhead, dominates each step, as on real hardware.
# LLaVA on CPU: LLM 4096 x 32 -> 256 x 4 (LLaMA's FFN ratio), CLIP ViT-L 1024 x 24 -> 64 x 2 at the real 336 px / 14.
# BLIP-2 on CPU: every width / 4 and every depth / 8 (ViT-g 1408 x 39 -> 352 x 5, Q-Former 768 x 12 -> 192 x 2,
# OPT-2.7B 2560 x 32 -> 640 x 4), vocabulary so the LM head keeps its ~5 % share of the LLM's work.
# Qwen2-VL-7B on CPU as LLaVA: widths / 16 (LLM 3584 -> 224, FFN 18944 -> 1184, ViT 1280 -> 80), LLM depth 28 -> 4,
# ViT depth 32 -> 3, 4 heads with 1 KV head (28 / 4 real), vocabulary so the LM head keeps its ~8 % share.
SHAPES = {
    "llava-576": {
        "cpu": dict(width=256, depth=4, heads=4, ffn=688, vocab=1000, v_width=64, v_depth=2),
        "full": dict(width=4096, depth=32, heads=32, ffn=11008, vocab=32064, v_width=1024, v_depth=24),
    },
    "blip2-257": {
        "cpu": dict(width=640, depth=4, heads=8, ffn=2560, vocab=1600, v_width=352, v_depth=5),
        "full": dict(width=2560, depth=32, heads=32, ffn=10240, vocab=50272, v_width=1408, v_depth=39),
    },
    "qwen2vl-256": {
        "cpu": dict(width=224, depth=4, heads=4, kv_heads=1, ffn=1184, vocab=1500, v_width=80, v_depth=3),
        "full": dict(width=3584, depth=28, heads=28, kv_heads=4, ffn=18944, vocab=152064, v_width=1280, v_depth=32),
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
    maker = {"llava": _llava, "blip2": _blip2, "qwen2vl": _qwen2_vl}[name.split("-")[0]]
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


def _qwen2_vl(width, depth, heads, kv_heads, ffn, vocab, v_width, v_depth) -> PersonalizedVLM:
    """Qwen2-VL at patch 14, merge 2, every photo resized to 448 x 448 (32 x 32 patches, 256 merged tokens)."""
    tokenizer = tiny_qwen2_vl.tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    half = width // heads // 2  # M-RoPE splits each head's rotary half into (t, h, w) sections, as 16/24/24 of 64
    section = half * 3 // 8
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [half - 2 * section, section, section]}
    text = dict(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=ffn,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rope_parameters=rope,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=ids("<|im_end|>"),
    )
    vision = dict(depth=v_depth, embed_dim=v_width, hidden_size=width, num_heads=max(v_width // 80, 1), patch_size=14)
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    side = 448
    processor = image_only(Qwen2VLProcessor)(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=14),
        tokenizer=tokenizer,
        chat_template=tiny_qwen2_vl.CHAT_TEMPLATE,
    )
    return PersonalizedVLM(Qwen2VLForConditionalGeneration(config), processor, "qwen2vl-256")


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
