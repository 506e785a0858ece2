"""Behaviour check for refactors: learned vectors, losses and gating on both toy models for fixed seeds.

    OMP_NUM_THREADS=1 python benchmarks/behaviour_check.py --out before.json
    OMP_NUM_THREADS=1 python benchmarks/behaviour_check.py --out after.json --compare before.json

Each run learns a toyworld concept on toy-llava and toy-blip2 (cached and the official uncached loop; toy-blip2 with
its 3 starts), learns two concepts together, and captions with and without the concept. It records the sha256 of each
learned vector's bytes, the losses, and the captions; `--compare` reports the largest difference per entry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import torch

import myvlm
from myvlm.toyworld import concept_data

STEPS = 30  # > probe_steps (20), so toy-blip2 probes its 3 starts and goes on from the best


def digest(vector: torch.Tensor) -> str:
    return hashlib.sha256(vector.detach().float().contiguous().numpy().tobytes()).hexdigest()


def run(model: str) -> dict:
    vlm = myvlm.load(model)
    data = concept_data(n_concepts=2, seed=0, n_positives=4, n_negatives=4, n_hard_negatives=0)
    out = {}
    for views in (4, None):
        for seed in (0, 1):
            concept = data[0].concept.identifier
            images = [e.image for e in data[0].train]
            examples = myvlm.caption_examples([[e.caption] for e in data[0].train])
            config = myvlm.TrainingConfig(steps=STEPS, seed=seed)
            result = myvlm.learn_concept(
                vlm, concept, concept, images, examples, config, views_per_image=views, progress=False
            )
            out[f"learn views={views} seed={seed}"] = {
                "sha256": digest(result.vector),
                "vector": result.vector.tolist(),
                "losses": result.losses,
                "steps_done": result.steps_done,
            }
    # a second concept, then both together
    second = data[1].concept.identifier
    images = [e.image for e in data[1].train]
    examples = myvlm.caption_examples([[e.caption] for e in data[1].train])
    myvlm.learn_concept(vlm, second, second, images, examples, myvlm.TrainingConfig(steps=10), progress=False)
    first = data[0].concept.identifier
    together_images = [e.image for e in data[0].train[:2] + data[1].train[:2]]
    present = [(first,), (first,), (second,), (second,)]
    together_examples = myvlm.caption_examples([[e.caption] for e in data[0].train[:2] + data[1].train[:2]])
    result = myvlm.learn_together(
        vlm,
        [first, second],
        together_images,
        together_examples,
        present,
        myvlm.TrainingConfig(steps=6),
        progress=False,
    )
    out["together"] = {"sha256": digest(result.vector), "vector": result.vector.tolist(), "losses": result.losses}
    test = [e.image for e in data[0].positives[:2] + data[0].negatives[:2]]
    base = vlm.caption(test, [[] for _ in test])
    personal = vlm.caption(test, [[first]] * len(test))
    out["captions"] = {"base": [c.text for c in base], "personalized": [c.text for c in personal]}
    return out


def compare(before: dict, after: dict) -> list[str]:
    lines = []
    for model in before:
        for key, entry in before[model].items():
            other = after[model][key]
            if key == "captions":
                lines.append(f"{model} {key}: {'same' if entry == other else 'DIFFERENT'}")
                continue
            same = entry["sha256"] == other["sha256"]
            diff = (torch.tensor(entry["vector"]) - torch.tensor(other["vector"])).abs().max().item()
            loss_diff = max((abs(a - b) for a, b in zip(entry["losses"], other["losses"], strict=True)), default=0.0)
            lines.append(
                f"{model} {key}: {'byte-identical' if same else 'differs'}, max |Δvector| {diff:.2e}, "
                f"max |Δloss| {loss_diff:.2e}"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {model: run(model) for model in ("toy-llava", "toy-blip2")}
    with open(args.out, "w") as f:
        json.dump(results, f)
    if args.compare:
        with open(args.compare) as f:
            lines = compare(json.load(f), results)
        print("\n".join(lines))
        return 0 if all("byte-identical" in line or "same" in line for line in lines) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
