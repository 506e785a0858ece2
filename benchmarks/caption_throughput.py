"""Captioning a photo library (issue #25): photos/s of today's one-by-one path, the batched local engine and the Ray
engine with 2 workers, on toy-llava and toy-blip2; and the local engine's peak RSS at 1,000 and 10,000 photos.

All on toyworld photos (every tenth shows a concept) with a one-concept library whose head and embedding are real
(tests/photo_library.py). One-by-one: each photo read and captioned alone (`vlm.caption([photo])`, detection
inside), as a loop over a library would do before the engine. Local and Ray: `myvlm caption FOLDER --out rows.jsonl`
in this process (Ray: its start and actor loading count, as a user waits for them). One-by-one and local: best of
three interleaved runs, after a warm-up. Peak RSS: a fresh `myvlm` process per size (`os.wait4`), `detect` by default
(every stage but the captioner, whose memory is per batch: 10,000 captions take an hour here) or `caption` with
--rss-command caption.

    python benchmarks/caption_throughput.py [--photos 64] [--batch-size 32] [--rss-sizes 1000 10000]
        [--rss-command detect] [--work DIR] [--json [FILE]]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))  # Ray's

from myvlm.cli import main  # noqa: E402
from myvlm.jobs import walk_images  # noqa: E402
from photo_library import concept_library, photo_folder  # noqa: E402

MODELS = ("toy-llava", "toy-blip2")


def folder_of(work: Path, count: int) -> Path:
    """`count` toyworld photos (no corrupt files), made once per work folder."""
    folder = work / f"photos-{count}"
    if not (folder / "done").exists():
        photo_folder(folder, count, corrupt=False)
        (folder / "done").write_text("")
    return folder


def library_for(work: Path, model: str) -> str:
    root = work / f"library-{model}"
    if not root.exists():
        concept_library(root, model)
    return str(root)


def one_by_one(model: str, folder: Path, library: str) -> float:
    """photos/s reading and captioning each photo alone, model load included."""
    from myvlm.library import ConceptLibrary
    from myvlm.model import load

    start = time.perf_counter()
    vlm = load(model)
    vlm.use_library(ConceptLibrary(library))
    paths = list(walk_images([folder]))
    from myvlm.images import load_image

    for path in paths:
        vlm.caption([load_image(path)], batch_size=1)
    return len(paths) / (time.perf_counter() - start)


def engine(model: str, folder: Path, library: str, out: Path, batch_size: int, *extra: str) -> float:
    """photos/s of `myvlm caption FOLDER --out` (model load, and Ray's start, included)."""
    count = len(list(walk_images([folder])))
    args = ["caption", str(folder), "--model", model, "--library", library, "--out", str(out), "--quiet"]
    start = time.perf_counter()
    assert main([*args, "--batch-size", str(batch_size), *extra]) == 0
    seconds = time.perf_counter() - start
    assert sum(1 for _ in out.open()) == count
    return count / seconds


def peak_rss_mb(command: str, folder: Path, library: str, out: Path, batch_size: int) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a fresh `myvlm` process running the job."""
    args = [sys.executable, "-m", "myvlm.cli", command, str(folder), "--library", library, "--out", str(out)]
    args += ["--quiet", "--batch-size", str(batch_size)] + (["--model", MODELS[0]] if command == "caption" else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    assert status == 0, f"{command} failed"
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def run(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="caption-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = folder_of(work, args.photos)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg()[0],
        "photos": args.photos,
        "batch_size": args.batch_size,
        "throughput": [],
        "rss": [],
    }
    for model in args.models:
        library = library_for(work, model)
        one_by_one(model, folder_of(work, 4), library)  # warm-up: first-use imports are no one's photos/s
        # Best of three interleaved runs each: the machine is shared, the fastest run is the least disturbed one.
        out, single, batched = work / f"{model}-local.jsonl", [], []
        for _ in range(3):
            single.append(one_by_one(model, folder, library))
            out.unlink(missing_ok=True)
            batched.append(engine(model, folder, library, out, args.batch_size))
        row = {"model": model, "one_by_one": round(max(single), 2), "local": round(max(batched), 2)}
        ray_out = work / f"{model}-ray.jsonl"
        ray_out.unlink(missing_ok=True)
        row["ray_2_workers"] = round(engine(model, folder, library, ray_out, args.batch_size, "--engine", "ray"), 2)
        row["rows_equal"] = out.read_text() == ray_out.read_text()
        row["local_vs_one_by_one"] = round(row["local"] / row["one_by_one"], 2)
        result["throughput"].append(row)
        print(json.dumps(row), file=sys.stderr)
    library = library_for(work, MODELS[0])
    for size in args.rss_sizes:
        out = work / f"rss-{size}.jsonl"
        out.unlink(missing_ok=True)
        peak, seconds = peak_rss_mb(args.rss_command, folder_of(work, size), library, out, args.batch_size)
        result["rss"].append({"command": args.rss_command, "photos": size, "peak_rss_mb": round(peak, 1)})
        result["rss"][-1]["photos_per_s"] = round(size / seconds, 1)
        print(json.dumps(result["rss"][-1]), file=sys.stderr)
    if len(result["rss"]) > 1:
        result["rss_growth_mb"] = round(result["rss"][-1]["peak_rss_mb"] - result["rss"][0]["peak_rss_mb"], 1)
    return result


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS, help="none: memory only")
    parser.add_argument("--photos", type=int, default=64, help="photos per throughput run")
    parser.add_argument("--batch-size", type=int, default=32, help="the engines' batch size")
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--rss-command", choices=["detect", "caption"], default="detect")
    parser.add_argument("--work", help="folder for photos, libraries and rows (kept; default: a new temporary one)")
    parser.add_argument("--json", nargs="?", const="-", help="print the results as JSON (or write them to FILE)")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    results = run(arguments)
    text = json.dumps(results, indent=2)
    if arguments.json and arguments.json != "-":
        Path(arguments.json).write_text(text + "\n")
    print(text)
