"""Inference speed: personalized captioning (concept heads + injection) against plain captioning of the same images,
and batch captioning throughput.

Overhead = personalized / plain - 1, with the concept injected into every image so the hooks do their full work
(detection by the concept heads is timed separately, in benchmarks/heads.py). Generation is greedy and always produces
exactly `--max-new-tokens` tokens, so a different caption length cannot pass for overhead.

    python benchmarks/infer_speed.py [--models toy-llava toy-blip2 llava-576 blip2-257] [--images 16]
        [--batch-size 8] [--device cpu] [--dtype float32] [--full] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from shaped_models import add_shape_arguments, available_models, build, concept_task

MODELS = ("toy-llava", "toy-blip2", "llava-576", "blip2-257")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(model: str, n_images: int, batch_size: int, device: str, dtype: str, full: bool, tokens: int) -> dict:
    vlm = build(model, full=full, dtype=getattr(torch, dtype), device=device)
    images, _, identifier, positives = concept_task(vlm, model)
    images = ((positives or images) * n_images)[:n_images]
    vlm.add_concept("concept", identifier, torch.randn(vlm.concept_width, generator=torch.Generator().manual_seed(0)))
    # Same number of generated tokens with and without the concept, so the overhead is the injection's alone.
    vlm.model.generation_config.min_new_tokens = tokens
    plain = [[] for _ in images]
    personalized = [["concept"] for _ in images]

    def caption(concepts, size=batch_size):
        return vlm.caption(images, concepts, batch_size=size, max_new_tokens=tokens)

    caption(plain)  # warm-up
    # Interleaved repeats, best of three: the machine is shared, so the minimum is the least disturbed run.
    plain_s, personal_s = [], []
    for _ in range(3):
        plain_s.append(timed(lambda: caption(plain)))
        personal_s.append(timed(lambda: caption(personalized)))
    single = timed(lambda: caption(personalized, 1))
    return {
        "model": model,
        "images": n_images,
        "batch_size": batch_size,
        "max_new_tokens": tokens,
        "plain_s": round(min(plain_s), 3),
        "personalized_s": round(min(personal_s), 3),
        "overhead_pct": round(100 * (min(personal_s) / min(plain_s) - 1), 1),
        "images_per_s_batched": round(n_images / min(personal_s), 2),
        "images_per_s_batch1": round(n_images / single, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    add_shape_arguments(parser)
    args = parser.parse_args()
    rows = []
    for model in available_models(args.models):
        row = measure(model, args.images, args.batch_size, args.device, args.dtype, args.full, args.max_new_tokens)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
