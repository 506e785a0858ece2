"""``python -m myvlm.toyworld build|export|evaluate``: rebuild the packaged toy models, export data, measure them."""

from __future__ import annotations

import argparse
import json
import time

from myvlm.toynames import TOY_MODELS
from myvlm.toyworld.data import export_dataset
from myvlm.toyworld.models import build_model, evaluate_base, model_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m myvlm.toyworld")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="pretrain a toy VLM from a seed (bit-for-bit for the same seed and threads)")
    build.add_argument("--model", choices=TOY_MODELS, required=True)
    build.add_argument("--out", help="output folder (default: the packaged folder)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--threads", type=int, default=2, help="torch threads; the packaged weights used 2")
    export = sub.add_parser("export", help="write a personalization dataset in the MyVLM layout")
    export.add_argument("--out", required=True)
    export.add_argument("--concepts", type=int, default=2)
    export.add_argument("--seed", type=int, default=0)
    evaluate = sub.add_parser("evaluate", help="base caption attribute accuracy and VQA on held-out scenes")
    evaluate.add_argument("--model", required=True, help="toy-llava, toy-blip2 or a model folder")
    evaluate.add_argument("-n", type=int, default=200)
    args = parser.parse_args(argv)
    if args.command == "build":
        start = time.time()
        out = build_model(args.model, args.out or model_path(args.model), seed=args.seed, threads=args.threads)
        print(f"built {args.model} in {time.time() - start:.0f}s -> {out}")
    elif args.command == "export":
        print(export_dataset(args.out, n_concepts=args.concepts, seed=args.seed))
    else:
        result = evaluate_base(args.model, n=args.n)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
