"""Two concepts in one photo: how often the caption names both, with the concepts trained alone and then together.

For each `toyworld export` seed and training seed: train the first two concepts alone (`train_concept`, 4 photos
each), caption the 10 held-out scenes holding both, then train them together (`train_together`, the export's 8
photos of both plus each one's own 4) and caption again. Single naming is the share of each concept's 20 unseen
photos whose caption names it (the lower of the two).

    python benchmarks/two_concepts.py [--models toy-blip2 toy-llava] [--exports 0 1 2] [--seeds 0 1 2 3] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from myvlm.images import load_image
from myvlm.library import ConceptLibrary
from myvlm.model import TOY_MODELS, load
from myvlm.personalize import train_concept, train_together
from myvlm.toyworld import export_dataset
from myvlm.training import word_pattern


def naming(vlm, names: list[str], data: Path) -> tuple[float, float]:
    """(share of two-concept scenes naming both, lower share of a concept's own photos naming it)."""
    pairs = [load_image(p) for p in sorted((data / "two_concepts").glob("*.png"))]
    both = np.mean([all(word_pattern(n).search(c.text) for n in names) for c in vlm.caption(pairs, [names] * 10)])
    alone = []
    for name in names:
        photos = [load_image(p) for p in sorted((data / name / "positives").glob("*.png"))]
        alone.append(np.mean([bool(word_pattern(name).search(c.text)) for c in vlm.caption(photos, [[name]] * 20)]))
    return float(both), float(min(alone))


def run(model: str, export_seed: int, seed: int, work: Path) -> dict:
    data = work / f"export{export_seed}"
    if not data.exists():
        export_dataset(data, n_concepts=2, seed=export_seed)
    names = [c["identifier"] for c in json.loads((data / "concepts.json").read_text())["concepts"]]
    library = ConceptLibrary(work / f"library-{model}-{export_seed}-{seed}")
    vlm = load(model)
    for name in names:
        library.create(name, kind="object")
        with contextlib.redirect_stdout(io.StringIO()):
            train_concept(library, name, model, captions=str(data / name / "captions.json"), seed=seed, vlm=vlm)
    both_alone, single_alone = naming(vlm, names, data)
    start, said = time.perf_counter(), io.StringIO()
    with contextlib.redirect_stdout(said):
        captions = [str(data / folder / "captions.json") for folder in ("together", *names)]
        train_together(library, names, model, captions=captions, seed=seed, vlm=vlm)
    seconds = time.perf_counter() - start
    both, single = naming(vlm, names, data)
    return {
        "model": model,
        "export_seed": export_seed,
        "seed": seed,
        "concepts": names,
        "both_alone": both_alone,
        "single_alone": single_alone,
        "both_together": both,
        "single_together": single,
        "kept_alone": "kept the embeddings trained alone" in said.getvalue(),
        "seconds_together": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["toy-blip2", "toy-llava"], choices=TOY_MODELS)
    parser.add_argument("--exports", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--json", help="write the rows as a JSON list to this file")
    args = parser.parse_args()
    rows = []
    print("| model | export | seed | concepts | both named: alone → together | single naming | kept alone | s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for model in args.models:
            for export_seed in args.exports:
                for seed in args.seeds:
                    row = run(model, export_seed, seed, Path(work))
                    rows.append(row)
                    print(
                        f"| {model} | {export_seed} | {seed} | {' + '.join(row['concepts'])} | "
                        f"{row['both_alone']:.2f} → {row['both_together']:.2f} | "
                        f"{row['single_alone']:.2f} → {row['single_together']:.2f} | {row['kept_alone']} | "
                        f"{row['seconds_together']} |",
                        flush=True,
                    )
    for model in args.models:
        mine = [r for r in rows if r["model"] == model]
        print(
            f"{model}: both named {np.mean([r['both_alone'] for r in mine]):.3f} alone, "
            f"{np.mean([r['both_together'] for r in mine]):.3f} together (lowest "
            f"{min(r['both_together'] for r in mine):.2f}); single naming at least "
            f"{min(r['single_together'] for r in mine):.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
