"""How long `myvlm serve` with no arguments takes to serve its page, and then to caption (issue #26: page within 30 s
on the 2-core machine).

Each round starts `python -m myvlm.cli serve` as a user would (default model toy-llava; a fresh library through
MYVLM_HOME, so no argument is needed; a free port through --port only because 7860 may be taken), then polls
GET / until it answers 200 ("page"). The model loads in the background after the page is up; the round then
captions one toyworld photo through the page's own API (gradio_client) and records when that answer came back
("first caption", model load included). The load average at the start of each round says how busy the shared
machine was, and the CPU time the server process had used when its page came up ("page_cpu_s", from /proc) is what
the page costs whatever the load: on an idle machine the wall time is about that (it is one busy thread, mostly
importing gradio).

    python benchmarks/serve_startup.py [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(folder: Path) -> dict:
    from gradio_client import Client, handle_file

    from myvlm.toyworld import concept_data

    photo = folder / "photo.png"
    concept_data(1, seed=0, n_positives=1, n_negatives=0, n_hard_negatives=0)[0].positives[0].image.save(photo)
    port = free_port()
    env = {**os.environ, "MYVLM_HOME": str(folder / "library")}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "myvlm.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
            if process.poll() is not None:
                raise SystemExit("myvlm serve exited before serving its page")
        page = time.perf_counter() - start
        page_cpu = cpu_seconds(process.pid)
        client = Client(url, verbose=False)
        client.predict([handle_file(str(photo))], api_name="/caption")
        caption = time.perf_counter() - start
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {
        "page_s": round(page, 2),
        "page_cpu_s": round(page_cpu, 2),
        "first_caption_s": round(caption, 2),
        "load_average": round(load, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the rounds and medians to this file")
    args = parser.parse_args()
    rounds = []
    for index in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="myvlm-serve-bench-") as folder:
            rounds.append(one_round(Path(folder)))
        print(f"round {index + 1}: {rounds[-1]}", flush=True)
    summary = {key: statistics.median(r[key] for r in rounds) for key in ("page_s", "page_cpu_s", "first_caption_s")}
    print(
        f"median: page served in {summary['page_s']:.1f} s ({summary['page_cpu_s']:.1f} s of CPU), first caption after "
        f"{summary['first_caption_s']:.1f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "median": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
