"""The demo's metrics over several concepts and both toy models: recall, precision and preservation of the
personalized captions, the head's recall/precision, and attribute accuracy of base vs personalized captions.

    python benchmarks/toyworld_demo.py [--models toy-llava toy-blip2] [--concepts 0 1 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from myvlm.demo import SUMMARY, run_demo
from myvlm.model import TOY_MODELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(TOY_MODELS), choices=TOY_MODELS)
    parser.add_argument("--concepts", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows as a JSON list to this file")
    args = parser.parse_args()
    rows = []
    print(f"| model | concept | {' | '.join(SUMMARY)} |")
    print(f"|---|---|{'---|' * len(SUMMARY)}")
    for model in args.models:
        for index in args.concepts:
            metrics = run_demo(model, seed=args.seed, concept_index=index, out=io.StringIO())
            rows.append(metrics)
            print(f"| {model} | {metrics['concept']} | {' | '.join(str(metrics[c]) for c in SUMMARY)} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
