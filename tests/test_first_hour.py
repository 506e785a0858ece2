"""What a new user hits in the first hour (issue #29): phone-size photos, a concept without a head, models that
cannot be downloaded, flags that error messages name, slow starts, toy names that leak into captions."""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import myvlm
from myvlm import cli
from myvlm.cli import main
from myvlm.images import LOAD_PIXELS, load_image
from myvlm.library import ConceptLibrary

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "myvlm.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("myvlm: error:"), result.stderr
    return lines[0]


# --- 1. phone photos are reduced on load --------------------------------------------------------------------------
def gradient(width: int, height: int) -> Image.Image:
    return Image.linear_gradient("L").resize((width, height)).convert("RGB")


def test_a_12_mp_jpeg_is_decoded_small_and_reduced_to_1_mp(tmp_path, monkeypatch):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise: a portrait phone photo stored landscape
    gradient(4032, 3024).save(path, quality=90, exif=exif)
    decoded = []
    original_load = Image.Image.load

    def spy(self):
        if getattr(self, "format", None) == "JPEG":
            decoded.append(self.size)
        return original_load(self)

    monkeypatch.setattr(Image.Image, "load", spy)
    image = load_image(path)
    assert decoded and max(w * h for w, h in decoded) <= 4 * LOAD_PIXELS  # draft mode: never the 12 MP
    assert image.width * image.height <= LOAD_PIXELS and image.width < image.height  # reduced, EXIF-rotated
    assert image.info["original_size"] == (3024, 4032)
    assert abs(image.width / image.height - 3024 / 4032) < 0.01
    assert load_image(path, max_pixels=None).size == (3024, 4032)


def test_small_photos_and_pngs(tmp_path):
    small = tmp_path / "small.jpg"
    gradient(1155, 866).save(small)
    assert load_image(small).size == (1155, 866)  # 1 MP: kept as it is
    big_png = tmp_path / "big.png"
    gradient(3000, 2000).save(big_png)
    image = load_image(big_png)
    assert image.width * image.height <= LOAD_PIXELS and image.info["original_size"] == (3000, 2000)


def test_detected_boxes_are_in_the_files_pixels():
    image = gradient(1000, 500)
    image.info["original_size"] = (4000, 2000)
    assert cli._file_box((10, 20, 30, 40), image) == [40.0, 80.0, 120.0, 160.0]
    assert cli._file_box(None, image) is None


# --- 2. concept heads from the public API; concepts without a head are named --------------------------------------
def test_readme_python_snippet_runs_as_written_and_names_the_concept(tmp_path):
    """The README's Python API block, with toy-llava for the hub model and a toyworld concept's photos for Bobby's."""
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    snippet = snippet.replace('"Salesforce/blip2-flan-t5-xl"', '"toy-llava"')
    assert main(["toyworld", "export", "--out", str(tmp_path / "data"), "--concepts", "1"]) == 0
    concept = json.loads((tmp_path / "data" / "concepts.json").read_text())["concepts"][0]["identifier"]
    training = sorted((tmp_path / "data" / concept).glob("train_*.png"))
    for index, photo in enumerate(training[:4]):
        Image.open(photo).convert("RGB").save(tmp_path / f"bobby{index + 1}.jpg", quality=95)
    held_out = sorted((tmp_path / "data" / concept / "positives").glob("*.png"))[0]
    Image.open(held_out).convert("RGB").save(tmp_path / "new.jpg", quality=95)
    torch.save({0: {"keys": torch.zeros(1, 4), "values": torch.zeros(1, 8)}}, tmp_path / next(
        iter(re.findall(r'"(concept_embeddings_\w+\.pt)"', snippet))
    ))
    (tmp_path / "snippet.py").write_text(snippet)
    env = {**os.environ, "MYVLM_HOME": str(tmp_path / "library"), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.strip().splitlines()
    assert len(printed) == 3, result.stdout
    assert "Bobby" in printed[0] and "Bobby" in printed[2], printed  # given, and found by the head
