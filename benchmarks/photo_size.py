"""What a photo's size costs: `myvlm concept add` of four 12-MP JPEGs against four 1-MP JPEGs (issue #29 point 1).

The photos are the first four real backpack photos (data/dreambooth/backpack) upscaled to 4032x3024 and 1155x866 and
saved as JPEG (quality 90) in a temporary folder. Each `concept add` runs as its own process into a fresh library;
wall time and the process's peak RSS (getrusage of the child) are recorded. The two sizes run interleaved, so a busy
shared CPU slows both alike, and the ratio 12-MP / 1-MP is reported (issue bar: time <= 1.5x, memory <= 1.2x).

    python benchmarks/photo_size.py [--rounds 3] [--data DATA] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

SIZES = {"12mp": (4032, 3024), "1mp": (1155, 866)}
CHILD = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:]).returncode
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)
"""


def make_photos(data: Path, out: Path) -> dict[str, list[Path]]:
    sources = sorted((data / "dreambooth" / "backpack").glob("*.jpg"))[:4]
    photos = {}
    for label, size in SIZES.items():
        folder = out / label
        folder.mkdir(parents=True)
        for source in sources:
            Image.open(source).convert("RGB").resize(size, Image.BICUBIC).save(folder / source.name, quality=90)
        photos[label] = sorted(folder.iterdir())
    return photos


def concept_add(photos: list[Path], library: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one `myvlm concept add` process."""
    command = [sys.executable, "-m", "myvlm.cli", "concept", "add", "bag", "--kind", "object", "--library"]
    command += [str(library), "--images", *map(str, photos)]
    result = subprocess.run([sys.executable, "-c", CHILD, *command], capture_output=True, text=True, check=True)
    seconds, peak_kb, code = result.stdout.split()[-3:]
    if code != "0":
        raise SystemExit(f"concept add failed: {result.stderr.strip()}")
    return float(seconds), int(peak_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in SIZES}
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(args.data, Path(tmp))
        for round_index in range(args.rounds):
            for label in SIZES:  # interleaved: both sizes see the same load on a shared machine
                runs[label].append(concept_add(photos[label], Path(tmp) / f"lib-{label}-{round_index}"))
                print(f"round {round_index + 1} {label}: {runs[label][-1][0]:.1f} s, {runs[label][-1][1]:.0f} MB")
    summary = {
        label: {"seconds": statistics.median(r[0] for r in rs), "peak_mb": statistics.median(r[1] for r in rs)}
        for label, rs in runs.items()
    }
    summary["ratio"] = {key: round(summary["12mp"][key] / summary["1mp"][key], 2) for key in ("seconds", "peak_mb")}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
