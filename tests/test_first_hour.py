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
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import myvlm
from myvlm import cli
from myvlm.cli import main
from myvlm.images import LOAD_PIXELS, file_box, load_image
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
    assert file_box((10, 20, 30, 40), image) == [40.0, 80.0, 120.0, 160.0]
    assert file_box(None, image) is None


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
    torch.save(
        {0: {"keys": torch.zeros(1, 4), "values": torch.zeros(1, 8)}},
        tmp_path / next(iter(re.findall(r'"(concept_embeddings_\w+\.pt)"', snippet))),
    )
    (tmp_path / "snippet.py").write_text(snippet)
    env = {**os.environ, "MYVLM_HOME": str(tmp_path / "library"), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.strip().splitlines()
    assert len(printed) == 3, result.stdout
    assert "Bobby" in printed[0] and "Bobby" in printed[2], printed  # given, and found by the head
    assert "Loading weights" not in result.stderr  # the toy models load in a blink: no bar


def test_caption_and_detect_say_which_concepts_have_no_head(tmp_path, capsys):
    from tiny_vlms import save, tiny_llava

    vlm = tiny_llava()
    model_dir = save(vlm, tmp_path / "tiny-llava")
    library = ConceptLibrary(tmp_path / "lib")
    library.create("nohead", kind="object")
    library.save_embedding("nohead", str(model_dir.resolve()), torch.randn(vlm.concept_width), family=vlm.family)
    photo = tmp_path / "photo.png"
    gradient(64, 64).save(photo)
    assert main(["caption", str(photo), "--model", str(model_dir), "--library", str(library.root)]) == 0
    assert "no concept head, never detected: nohead" in capsys.readouterr().err
    assert main(["detect", str(photo), "--library", str(library.root)]) == 2
    err = capsys.readouterr().err
    assert "no concept head, never detected: nohead" in err and "no concepts with heads" in err


def test_library_create_builds_the_head_from_photos(tmp_path):
    images = [gradient(96, 64).rotate(angle) for angle in (0, 5, 10)]
    concept = ConceptLibrary(tmp_path).create("Rex", kind="object", photos=images)
    assert concept.head and concept.head["type"] == "object"
    assert isinstance(ConceptLibrary(tmp_path).load_head("Rex"), myvlm.ObjectHead)
    with pytest.raises(myvlm.MyVLMError, match="not both"):
        ConceptLibrary(tmp_path).create("Max", kind="object", photos=images, head=object())


# --- 3. models that cannot be downloaded fail fast, in one line -----------------------------------------------------
@pytest.mark.parametrize(
    ("model", "env", "message"),
    [
        ("toy-lava", {}, "unknown model 'toy-lava'; did you mean toy-llava?"),
        (
            "Salesforce/blip2-opt-2.7b",
            {"HF_HUB_OFFLINE": "1"},
            "not in the local Hugging Face cache and HF_HUB_OFFLINE",
        ),
        ("Salesforce/blip2-opt-2.7", {"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached"),
    ],
)
def test_a_model_that_cannot_be_loaded_fails_fast_in_one_line(tmp_path, model, env, message):
    env = {"HF_HOME": str(tmp_path / "hf"), **env}
    result = run_cli("caption", "x.jpg", "--model", model, "--library", str(tmp_path / "lib"), env=env)
    line = one_line_error(result)
    assert message in line, line
    if model.endswith("2.7"):
        assert "did you mean Salesforce/blip2-opt-2.7b?" in line
    assert "Retry" not in result.stderr


# --- 4. concept edit; every flag an error names exists on its command ----------------------------------------------
def test_concept_edit_changes_identifier_and_class_word(tmp_path, capsys):
    library = ConceptLibrary(tmp_path)
    library.create("Mia", kind="object")
    library.create("Leo", kind="object")
    lib = ["--library", str(tmp_path)]
    assert main(["concept", "edit", "Mia", "--class-word", "toy", "--identifier", "Mimi", *lib]) == 0
    assert (library.get("Mia").identifier, library.get("Mia").class_word) == ("Mimi", "toy")
    assert main(["concept", "edit", "Mia", "--identifier", "Leo", *lib]) == 2
    assert "already used by concept 'Leo'" in capsys.readouterr().err
    assert main(["concept", "edit", "Mia", *lib]) == 2
    assert "nothing to change" in capsys.readouterr().err
    library.save_embedding("Mia", "toy-llava", torch.ones(4))
    assert main(["concept", "edit", "Mia", "--identifier", "Mira", *lib]) == 0
    assert "retrain them with `myvlm train Mia --model MODEL`" in capsys.readouterr().err
    assert main(["concept", "list", *lib]) == 0
    listed = capsys.readouterr().out
    assert "class=None" not in listed and "no head" in listed


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {prefix: parser} if prefix else {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= commands(sub, f"{prefix} {name}".strip())
    return found


def strings_reached(function, seen: set) -> list[str]:
    """String literals (f-strings with their fields as X) of a function and of the myvlm functions it calls."""
    if function in seen or not getattr(function, "__module__", "").startswith("myvlm"):
        return []
    seen.add(function)
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    local_imports = {
        alias.asname or alias.name: (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("myvlm")
        for alias in node.names
    }
    found = []
    in_fstrings = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            found.append("".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_fstrings:
            found.append(node.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            target = function.__globals__.get(name)
            if name in local_imports:
                module, attribute = local_imports[name]
                target = getattr(__import__(module, fromlist=[attribute]), attribute, None)
            if inspect.isfunction(target):
                found += strings_reached(target, seen)
    return found


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def test_every_flag_a_message_names_exists_on_its_command():
    parsers = commands(cli.build_parser())
    flags = {name: {o for a in p._actions for o in a.option_strings} for name, p in parsers.items()}
    names = "|".join(sorted(map(re.escape, parsers), key=len, reverse=True))
    mention = re.compile(rf"myvlm ({names})\b([^`)]*)")  # "`myvlm train X --model M`": flags of that command
    checked = 0
    for name, parser in parsers.items():
        handler = parser.get_default("handler")
        if handler is None:
            continue
        for text in strings_reached(handler, set()):
            for command, rest in mention.findall(text):
                for flag in FLAG.findall(rest):
                    assert flag in flags[command], f"{name}: {text!r} names {flag}, which `{command}` lacks"
                    checked += 1
            for flag in FLAG.findall(mention.sub("", text)):
                assert flag in flags[name], f"`myvlm {name}` says {text!r}, but has no {flag}"
                checked += 1
    assert checked > 10


# --- 6. fast feedback ----------------------------------------------------------------------------------------------
def test_help_and_library_commands_load_no_torch(tmp_path):
    code = (
        "import sys, contextlib, io\n"
        "from myvlm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main(['concept', 'list', '--library', {str(tmp_path)!r}])\n"
        "    main(['concept', 'remove', 'x', '--library', " + repr(str(tmp_path)) + "])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
    assert run_cli("--version").stdout.strip() == f"myvlm {myvlm.__version__}"


def test_a_bad_identifier_is_refused_before_any_photo_is_read(tmp_path):
    result = run_cli(
        "concept", "add", "Rex", "--kind", "object", "--images", "missing.jpg", "--identifier", "a/b",
        "--library", str(tmp_path),
    )  # fmt: skip
    assert "identifier 'a/b' may not contain" in one_line_error(result)


def test_retraining_says_it_replaces_the_embedding(tmp_path, capsys):
    library = ConceptLibrary(tmp_path)
    library.create("Mia", kind="object")
    library.save_embedding("Mia", "toy-llava", torch.ones(4))
    cli._note_retraining(library, "Mia", "toy-llava", resume=False)
    assert "replacing the embedding of 'Mia' for toy-llava saved 20" in capsys.readouterr().err
    cli._note_retraining(library, "Mia", "toy-llava", resume=True)
    cli._note_retraining(library, "Mia", "toy-blip2", resume=False)
    assert capsys.readouterr().err == ""


# --- 8. no name the user did not give ------------------------------------------------------------------------------
def test_toy_models_name_only_the_active_concepts(tmp_path):
    from myvlm.toyworld import NAMES, render_scene, sample_scene

    vlm = myvlm.load("toy-llava")
    torch.manual_seed(0)
    vlm.add_concept("fresh", "Quinn", torch.randn(vlm.concept_width))
    vlm.add_concept("other", "Mia", torch.randn(vlm.concept_width))
    scenes = [render_scene(sample_scene(seed)) for seed in range(6)]
    photo = sorted((ROOT.parent / "shared" / "data" / "dreambooth" / "backpack").glob("*.jpg"))
    scenes += [load_image(photo[0])] if photo else []
    texts = [c.text for c in vlm.caption(scenes)]  # nothing active
    texts += [c.text for c in vlm.caption(scenes, concepts=[["fresh"]] * len(scenes))]
    texts += [vlm.ask(image, "What is in the photo?", concepts=["fresh"]).text for image in scenes[:3]]
    words = {w for text in texts for w in re.findall(r"[A-Za-z]+", text)}
    assert not words & (set(NAMES) | {"Mia"}), texts


# --- 7. polish -----------------------------------------------------------------------------------------------------
def test_every_argument_has_help_text():
    for name, parser in commands(cli.build_parser()).items():
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                assert action.help, f"`myvlm {name}` {action.dest} has no help text"


def test_report_thumbnails_are_jpeg_and_small():
    from myvlm.report import thumbnail_data_uri

    photos = sorted((ROOT.parent / "shared" / "data" / "dreambooth" / "backpack").glob("*.jpg"))
    image = load_image(photos[0]) if photos else Image.effect_noise((512, 512), 64).convert("RGB")
    uri = thumbnail_data_uri(image)
    assert uri.startswith("data:image/jpeg;base64,") and len(uri) < 60_000, len(uri)  # as PNG: ~114 KB
