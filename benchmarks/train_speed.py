"""Training speed: the official-style loop (full forward/backward, eager attention, fresh augmentation every step)
against the cached loop (`learn_concept` with a pool of cached views, the default), same model, data, seed, steps.

Each run is a fresh process, so its peak memory is its own: peak RSS above the RSS after loading (CPU), or peak
allocated memory (CUDA). Recall is measured on held-out concept images for the toy models only.

    python benchmarks/train_speed.py [--models toy-llava toy-blip2 llava-576 blip2-257 qwen2vl-256] [--steps 100]
        [--device cpu] [--dtype float32] [--full] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import torch

MODELS = ("toy-llava", "toy-blip2", "llava-576", "blip2-257", "qwen2vl-256")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(model: str, loop: str, steps: int, device: str, dtype: str, full: bool) -> dict:
    """Train one concept with one loop in this (fresh) process; seconds, peak memory and recall."""
    from myvlm.training import VIEWS_PER_IMAGE, TrainingConfig, caption_examples, learn_concept
    from shaped_models import TOY, build, concept_task, recall

    vlm = build(model, full=full, dtype=getattr(torch, dtype), device=device)
    images, captions, identifier, positives = concept_task(vlm, model)
    views_per_image = None if loop == "reference" else VIEWS_PER_IMAGE
    if loop == "reference":
        vlm.model.set_attn_implementation("eager")
    config = TrainingConfig(steps=steps, starts=1)  # the loop itself: BLIP-2 probing 3 starts adds 2 x 20 steps
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
        base = _rss_mb("VmRSS")
    start = time.perf_counter()
    result = learn_concept(
        vlm,
        "concept",
        identifier,
        images,
        caption_examples(captions),
        config,
        views_per_image=views_per_image,
        progress=False,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _rss_mb("VmHWM") - base
    vlm.model.set_attn_implementation("sdpa")
    score = recall(vlm, "concept", identifier, positives) if model in TOY else None
    return {"seconds": seconds, "peak_mb": peak, "recall": score, "final_loss": result.losses[-1]}


def _in_fresh_process(*args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_one, args)


def main() -> None:
    from shaped_models import add_shape_arguments, available_models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=100)
    add_shape_arguments(parser)
    args = parser.parse_args()

    rows = []
    for model in available_models(args.models):
        reference = _in_fresh_process(model, "reference", args.steps, args.device, args.dtype, args.full)
        fast = _in_fresh_process(model, "fast", args.steps, args.device, args.dtype, args.full)
        row = {
            "model": model,
            "reference_s": round(reference["seconds"], 2),
            "fast_s": round(fast["seconds"], 2),
            "ratio": round(reference["seconds"] / fast["seconds"], 2),
            "reference_recall": reference["recall"],
            "fast_recall": fast["recall"],
            "reference_peak_mb": round(reference["peak_mb"], 1),
            "fast_peak_mb": round(fast["peak_mb"], 1),
            "reference_final_loss": round(reference["final_loss"], 4),
            "fast_final_loss": round(fast["final_loss"], 4),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
