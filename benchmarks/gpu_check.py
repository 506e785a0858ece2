"""The GPU check of issue #27: random-weight models of the real full sizes, built on the GPU in bfloat16, timed.

Rows (one per model, to a JSON file):

* LLaVA-1.5-7B and BLIP-2 Flan-T5-XL: seconds per 100-step concept for the cached loop (the default) and the
  official-style loop (full forward/backward, eager attention, fresh augmentation every step): the fixed cost (view
  pool, first step) plus 100 times the steady seconds per step, both measured over `--steps` steps; caption latency
  of one image without and with a concept (same number of new tokens); peak GPU memory of the whole row.
* Qwen2-VL-7B (the modern family): plain caption latency (generate from one image's tokens) and peak memory only;
  concept rows wait on its backend, which is not implemented yet.

Random weights cannot say anything, so no recall: this measures time and memory on the real shapes. Models are
built directly on the device in bfloat16 (no CPU copy, no download), one after another, each freed before the next.

    python benchmarks/gpu_check.py --out benchmarks/gpu_check.json          # on a GPU (benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check.json         # the same code path, tiny, on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    T5Config,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from myvlm.training import VIEWS_PER_IMAGE, TrainingConfig, caption_examples, learn_concept  # noqa: E402
from shaped_models import SHAPES, _llava, blip2_model, concept_task  # noqa: E402

# Full sizes of the real checkpoints (config.json of each) and tiny stand-ins with the same code path for CPU.
LLAVA = {
    "full": SHAPES["llava-576"]["full"],
    "tiny": dict(width=64, depth=2, heads=2, ffn=128, vocab=200, v_width=32, v_depth=1),
}
# Flan-T5-XL: d_model 2048, d_ff 5120, 24 + 24 layers, 32 heads of 64; ViT-g 1408 x 39; Q-Former 768 x 12.
BLIP2_T5 = {
    "full": dict(
        d_model=2048,
        d_ff=5120,
        layers=24,
        heads=32,
        vocab=32128,
        v_width=1408,
        v_depth=39,
        v_heads=16,
        v_ffn=6144,
        q_width=768,
        q_depth=12,
        q_heads=12,
        q_ffn=3072,
    ),
    "tiny": dict(
        d_model=64,
        d_ff=128,
        layers=2,
        heads=2,
        vocab=200,
        v_width=48,
        v_depth=1,
        v_heads=2,
        v_ffn=96,
        q_width=32,
        q_depth=2,
        q_heads=2,
        q_ffn=64,
    ),
}
# Qwen2-VL-7B-Instruct: LLM 3584 x 28 (28 heads, 4 KV heads, FFN 18944), vision 1280 x 32, merger to 3584.
QWEN2_VL = {
    "full": dict(
        width=3584,
        depth=28,
        heads=28,
        kv=4,
        ffn=18944,
        vocab=152064,
        v_width=1280,
        v_depth=32,
        v_heads=16,
        mrope=[16, 24, 24],
    ),
    "tiny": dict(
        width=64, depth=2, heads=4, kv=2, ffn=128, vocab=152064, v_width=32, v_depth=1, v_heads=2, mrope=[2, 3, 3]
    ),
}


def blip2_t5(d_model, d_ff, layers, heads, vocab, v_width, v_depth, v_heads, v_ffn, q_width, q_depth, q_heads, q_ffn):
    """A random BLIP-2 Flan-T5 model of these sizes with a tiny word-level tokenizer (ids stay below its vocab)."""
    text = T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    vision = dict(initializer_range=0.02, num_attention_heads=v_heads, intermediate_size=v_ffn)
    qformer = dict(hidden_size=q_width, num_hidden_layers=q_depth, num_attention_heads=q_heads, intermediate_size=q_ffn)
    return blip2_model(text, v_width, v_depth, vision, qformer, "blip2-flan-t5-xl-shaped")


def qwen2_vl(width, depth, heads, kv, ffn, vocab, v_width, v_depth, v_heads, mrope):
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            intermediate_size=ffn,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
        ),
        vision_config=dict(depth=v_depth, embed_dim=v_width, hidden_size=width, num_heads=v_heads),
    )
    return Qwen2VLForConditionalGeneration(config)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def build_on(device: str, dtype: torch.dtype, make):
    """Construct on the device in the dtype directly: a 7B model never passes through CPU memory or float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            return make()
    finally:
        torch.set_default_dtype(previous)


def concept_row(name: str, make, device: str, dtype: torch.dtype, steps: int, tokens: int) -> dict:
    """Training seconds (both loops, scaled to 100 steps), caption latency with and without a concept, peak memory."""
    reset_peak(device)
    start = time.perf_counter()
    vlm = build_on(device, dtype, make)
    row = {"model": name, "build_s": round(time.perf_counter() - start, 1), "steps_measured": steps}
    images, captions, identifier, _ = concept_task(vlm, name)
    examples = caption_examples(captions)
    config = TrainingConfig(steps=steps, starts=1)
    for loop, views in (("fast", VIEWS_PER_IMAGE), ("official", None)):
        if views is None:
            vlm.model.set_attn_implementation("eager")
        stamps = []  # the end of each step (loss.item() has synchronized by then)
        synchronize(device)
        begin = time.perf_counter()
        learn_concept(
            vlm,
            "concept",
            identifier,
            images,
            examples,
            config,
            views_per_image=views,
            progress=False,
            on_step=lambda *_, stamps=stamps: stamps.append(time.perf_counter()),
        )
        vlm.model.set_attn_implementation("sdpa")
        # Fixed cost (the view pool, the first step's warm-up) once, plus 100 times the steady per-step time.
        per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        fixed = stamps[0] - begin - per_step
        row[f"{loop}_s_per_step"] = round(per_step, 4)
        row[f"{loop}_fixed_s"] = round(fixed, 2)
        row[f"{loop}_s_per_100_steps"] = round(fixed + 100 * per_step, 2)
    vlm.model.generation_config.min_new_tokens = tokens  # the same work with and without the concept
    for label, concepts in (("plain", [[]]), ("concept", [["concept"]])):
        vlm.caption(images[:1], concepts, max_new_tokens=tokens)  # warm-up
        best = min(
            timed(device, lambda c=concepts: vlm.caption(images[:1], c, max_new_tokens=tokens)) for _ in range(3)
        )
        row[f"caption_{label}_s"] = round(best, 3)
    row["caption_tokens"] = tokens
    row["peak_gb"] = peak_gb(device)
    return row  # the model is freed on return; reset_peak collects it before the next row


def qwen_row(size: dict, device: str, dtype: torch.dtype, tokens: int) -> dict:
    """Qwen2-VL-7B: a plain caption (generate from one 336 x 336 image) and peak memory; no concept rows yet."""
    reset_peak(device)
    start = time.perf_counter()
    model = build_on(device, dtype, lambda: qwen2_vl(**size)).eval()
    config = model.config
    build_s = round(time.perf_counter() - start, 1)
    grid = 24  # 336 px / 14: 576 patches, merged 2 x 2 into 144 image tokens
    n_image = grid * grid // 4
    ids = [config.vision_start_token_id] + [config.image_token_id] * n_image + [config.vision_end_token_id]
    ids = [1, 2, 3] + ids + [5, 6, 7, 8]
    inputs = {
        "input_ids": torch.tensor([ids], device=device),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
        "pixel_values": torch.randn(grid * grid, 3 * 2 * 14 * 14, device=device, dtype=dtype),
        "image_grid_thw": torch.tensor([[1, grid, grid]], device=device),
    }

    def caption():
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    caption()  # warm-up
    best = min(timed(device, caption) for _ in range(3))
    row = {
        "model": "qwen2-vl-7b-shaped",
        "build_s": build_s,
        "caption_plain_s": round(best, 3),
        "caption_tokens": tokens,
        "peak_gb": peak_gb(device),
        "note": "plain generate only: concept rows wait on the Qwen2-VL backend (not implemented yet)",
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the rows")
    parser.add_argument("--tiny", action="store_true", help="tiny stand-ins on the CPU in float32: the code path only")
    parser.add_argument("--steps", type=int, help="training steps measured per loop (default: 20; tiny: 3)")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per caption")
    parser.add_argument("--models", nargs="+", default=["llava", "blip2-t5", "qwen2-vl"])
    args = parser.parse_args()
    size = "tiny" if args.tiny else "full"
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    steps = max(args.steps or (3 if args.tiny else 20), 2)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here; run with --tiny for the CPU code path")
    result = {
        "machine": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        "rows": [],
    }
    makers = {
        "llava": ("llava-1.5-7b-shaped", lambda: _llava(**LLAVA[size])),
        "blip2-t5": ("blip2-flan-t5-xl-shaped", lambda: blip2_t5(**BLIP2_T5[size])),
    }
    out = Path(args.out)
    for key in args.models:
        start = time.perf_counter()
        if key == "qwen2-vl":
            row = qwen_row(QWEN2_VL[size], device, dtype, args.tokens)
        else:
            row = concept_row(*makers[key], device, dtype, steps, args.tokens)
        row["row_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        out.write_text(json.dumps(result, indent=2) + "\n")  # after every row: a timeout keeps what finished


if __name__ == "__main__":
    main()
