"""`myvlm serve` in a real browser: Chromium from Debian's packages driven by Playwright, against the app started as a
user starts it. It enrols a toyworld concept from uploaded photos, trains it on toy-llava, captions an unseen photo
of it (identifier in the caption, a box on the photo), shows a corrupt upload's error and keeps serving, and serves
two pages at once. Under CI=true a missing browser or Playwright fails the test; elsewhere it skips."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from myvlm.cli import main
from myvlm.errors import MyVLMError
from myvlm.serve import check_exposure, parse_auth, read_uploads

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
SCREENSHOTS = os.environ.get("MYVLM_SCREENSHOTS")  # a folder to keep the screenshots in (docs/serve.png comes from it)
STEPS = 60  # toy-llava names the concept after 60 steps; well under a minute


def browser_or_fail():
    """The Playwright module and Debian's Chromium, or a skip (a failure in CI, whose .ci/run installs both)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if IN_CI:
            pytest.fail("playwright is not installed; .ci/run installs it with the test extra")
        pytest.skip("playwright is not installed (pip install 'myvlm[test]')")
    if CHROMIUM is None:
        if IN_CI:
            pytest.fail("chromium is not installed; .ci/run installs it with apt-get install chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return sync_playwright


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A toyworld concept's 4 training photos with their captions, photos without it, an unseen photo of it, and a
    corrupt file."""
    from myvlm.toyworld import concept_data

    folder = tmp_path_factory.mktemp("photos")
    data = concept_data(1, seed=0, n_positives=1, n_negatives=4, n_hard_negatives=4)[0]
    named = {"train": data.train, "negative": data.negatives + data.hard_negatives, "unseen": data.positives}
    paths = {}
    for kind, examples in named.items():
        paths[kind] = []
        for index, example in enumerate(examples):
            path = folder / f"{kind}_{index}.png"
            example.image.save(path)
            paths[kind].append(str(path))
    captions = {Path(path).name: [example.caption] for path, example in zip(paths["train"], data.train, strict=True)}
    (folder / "captions.json").write_text(json.dumps(captions))
    paths["captions"] = [str(folder / "captions.json")]
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a photo" * 20)
    paths["corrupt"] = [str(corrupt)]
    return data.concept, paths


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`myvlm serve` on a free port with an empty library, as a user starts it."""
    library = tmp_path_factory.mktemp("library")
    port = free_port()
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")  # noqa: SIM115 - read back on failure
    process = subprocess.Popen(
        [sys.executable, "-m", "myvlm.cli", "serve", "--library", str(library), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120  # 30 s on an idle 2-core machine (benchmarks/RESULTS.md); CI shares its CPUs
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log.seek(0)
            pytest.fail(f"myvlm serve did not come up: {log.read()[-2000:]}")
        time.sleep(0.5)
    yield url
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def uploaded(page, element: str, filename: str) -> None:
    """Wait until the file component shows the file (uploaded, or to download)."""
    page.locator(f"#{element} td.filename[aria-label='{filename}']").wait_for()


def shot(page, path: Path, name: str) -> None:
    page.screenshot(path=str(path / f"{name}.png"), full_page=True)
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


def test_enrol_train_caption_in_a_browser(server, photos, tmp_path):
    sync_playwright = browser_or_fail()
    concept, paths = photos
    name = concept.identifier
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(300_000)  # a busy shared CI machine: minutes where an idle one takes seconds
        page.goto(server)
        page.get_by_text("No concepts in").wait_for()

        # Add a concept: its photos, photos without it, name, class word; the head's calibration shows.
        page.get_by_role("tab", name="Add a concept").click()
        page.locator("#photos input[type=file]").set_input_files(paths["train"])
        page.locator("#negatives input[type=file]").set_input_files(paths["negative"])
        uploaded(page, "photos", "train_3.png")
        page.locator("#captions-file input[type=file]").set_input_files(paths["captions"])
        uploaded(page, "negatives", "negative_7.png")
        uploaded(page, "captions-file", "captions.json")
        page.locator("#name").get_by_role("textbox").fill(name)
        page.locator("#class-word").get_by_role("textbox").fill(concept.shape)
        page.locator("#add").click()
        calibration = page.locator("#calibration")
        calibration.get_by_text("leave-one-out score").wait_for()
        for index in range(4):
            assert f"train_{index}.png" in calibration.inner_text()
        shot(page, tmp_path, "serve-add")

        # The same name again: a clear message, nothing changes.
        page.locator("#add").click()
        page.get_by_text(f"a concept named '{name}' already exists").first.wait_for()

        # Train it on toy-llava: the progress bar says the loss; the concepts list then names the model.
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-names").get_by_label(name).check()
        page.locator("#steps").get_by_role("spinbutton").fill(str(STEPS))
        page.locator("#train").click()
        page.get_by_text(re.compile(rf"{name}: step \d+/\d+, loss \d")).first.wait_for()  # the progress bar
        page.locator("#trained").get_by_text(f"trained '{name}' for toy-llava").wait_for()
        shot(page, tmp_path, "serve-train")

        # A corrupt upload: one message on the page, and the app keeps serving.
        page.get_by_role("tab", name="Caption & ask").click()
        page.locator("#caption-photos input[type=file]").set_input_files(paths["corrupt"])
        uploaded(page, "caption-photos", "corrupt.png")
        page.locator("#caption").click()
        page.get_by_text("corrupt.png: corrupt or truncated image").first.wait_for()

        # Two pages at once: a second one lists the trained concept while the first captions the unseen photo.
        second = browser.new_page()
        second.goto(server)
        page.locator("#caption-photos button[aria-label='Clear']").first.click()
        page.locator("#caption-photos input[type=file]").set_input_files(paths["unseen"])
        uploaded(page, "caption-photos", "unseen_0.png")
        page.locator("#caption").click()
        second.locator("#concepts").get_by_text("toy-llava").wait_for()
        card = page.locator("#captions .myvlm-photo")
        card.wait_for()
        box = page.locator("#captions .myvlm-box")
        assert box.count() >= 1 and box.first.is_visible()
        assert name in box.first.inner_text()
        personalized = page.locator("#captions .myvlm-personal").inner_text()
        base = page.locator("#captions .myvlm-base").inner_text()
        assert name in personalized.split(), (personalized, base)
        assert name not in base.split(), base
        uploaded(page, "json", "captions.json")  # the downloads
        uploaded(page, "report", "captions.html")

        # A question about it, answered by the personalized and the base model.
        page.locator("#question").get_by_role("textbox").fill(f"Where is {name} in the image?")
        page.locator("#ask").click()
        page.locator("#answer").get_by_text("personalized").wait_for()
        shot(page, tmp_path, "serve-caption")
        second.close()
        browser.close()


def test_bad_uploads_are_one_line_each(tmp_path):
    """What the page shows for each bad upload, without a browser: the file as the user named it, and why."""
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    bomb = tmp_path / "bomb.png"
    from PIL import Image

    Image.new("1", (9000, 9000)).save(bomb)  # 81 MP: over the pixel limit, a few KB on disk
    for path, message in (
        ("notes.txt", "notes.txt: not an image file"),
        ("broken.jpg", "broken.jpg: "),
        ("bomb.png", "bomb.png: image is 9000x9000, over the"),
    ):
        with pytest.raises(MyVLMError) as error:
            read_uploads([str(tmp_path / path)], "photos")
        assert str(error.value).startswith(message) and str(tmp_path) not in str(error.value), error.value
    with pytest.raises(MyVLMError, match="at least 4 photos"):
        read_uploads([str(bomb)], "photos of the concept", at_least=4)


def test_exposed_only_with_a_password(capsys):
    assert parse_auth("ann:secret") == ("ann", "secret")
    check_exposure("127.0.0.1", None, share=False)
    check_exposure("0.0.0.0", ("ann", "secret"), share=False)
    with pytest.raises(MyVLMError, match="give --auth"):
        check_exposure("0.0.0.0", None, share=False)
    with pytest.raises(MyVLMError, match="give --auth"):
        check_exposure("localhost", None, share=True)
    assert main(["serve", "--host", "192.168.1.5"]) == 2
    assert "reachable from other machines; give --auth USER:PASS" in capsys.readouterr().err
    assert main(["serve", "--auth", "nopassword"]) == 2
    assert "--auth takes USER:PASS" in capsys.readouterr().err


def test_without_gradio_one_line_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` meets where it is not installed
    assert main(["serve", "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.strip() == "myvlm: error: the web app needs gradio: pip install 'myvlm[serve]'"


def test_cancel_keeps_the_best_so_far(photos, tmp_path):
    """Cancel during a training stops it after the current step and stores the best vector so far as an interrupted
    (resumable) training, as Ctrl-C does on the command line."""
    from myvlm.library import ConceptLibrary
    from myvlm.serve import App, PhotoStore

    concept, paths = photos
    library = ConceptLibrary(tmp_path / "library")
    library.create(concept.identifier, kind="object", class_word=concept.shape)
    train = [Path(p) for p in paths["train"]]
    captions = json.loads(Path(paths["captions"][0]).read_text())
    PhotoStore(library.root).save(concept.identifier, train, captions)
    app = App("toy-llava", str(library.root))
    seen = []

    def report(name, done, total, loss):
        seen.append(done)
        if done == 3:
            assert app.cancel() == "cancelling after the current step..."

    message = app.train([concept.identifier], "toy-llava", 50, report)
    assert message.startswith(f"cancelled: kept the best embedding of '{concept.identifier}' (step "), message
    assert seen == [1, 2, 3]
    entry = library.get(concept.identifier).embedding("toy-llava")
    assert not entry.complete and entry.steps <= 3
    assert app.cancel() == "no training is running"
