"""The command line: concept management on real photos, one-line errors, import, train/caption on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from myvlm.cli import main
from myvlm.library import ConceptLibrary
from tiny_vlms import photos, save, tiny_llava

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_photos = pytest.mark.skipif(not DATA.is_dir(), reason=f"real photos not found at {DATA}")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "myvlm.cli", *args], capture_output=True, text=True, timeout=600)


@needs_photos
def test_concept_add_list_detect_remove_on_real_photos(tmp_path, capsys):
    library = str(tmp_path / "lib")
    dog = sorted((DATA / "dreambooth" / "dog").glob("*.jpg"))
    assert (
        main(
            [
                "concept",
                "add",
                "Rex",
                "--kind",
                "object",
                "--class-word",
                "dog",
                "--images",
                *map(str, dog[:4]),
                "--library",
                library,
            ]
        )
        == 0
    )
    assert main(["concept", "list", "--json", "--library", library]) == 0
    listed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert listed == [
        {
            "name": "Rex",
            "status": "ok",
            "identifier": "Rex",
            "kind": "object",
            "class_word": "dog",
            "head": True,
            "models": [],
        }
    ]
    out = tmp_path / "detections.json"
    scene = DATA / "negatives" / "giraffe.jpg"
    assert main(["detect", str(dog[4]), str(scene), "--json", str(out), "--library", library]) == 0
    detections = json.loads(out.read_text())
    assert [d["image"] for d in detections] == [str(dog[4]), str(scene)]
    assert [x["concept"] for x in detections[0]["detections"]] == ["Rex"]
    left, top, right, bottom = detections[0]["detections"][0]["box"]  # the best region, in the photo's pixels
    assert 0 <= left < right and 0 <= top < bottom and right * bottom > 0
    assert detections[1]["detections"] == []
    assert main(["concept", "remove", "Rex", "--library", library]) == 0
    assert ConceptLibrary(library).concepts() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["concept", "add", "../evil", "--kind", "object", "--images", "x.jpg"], "may not contain path separators"),
        (["concept", "add", "", "--kind", "object", "--images", "x.jpg"], "concept name is empty"),
        (["concept", "add", "Rex", "--kind", "object", "--images", "missing.jpg"], "missing.jpg: no such file"),
        (["concept", "remove", "Nobody"], "no concept named 'Nobody'"),
        (["detect", "missing-folder"], "no concepts with heads"),
        (["caption", "x.jpg", "--model", "/nonexistent/model"], "cannot load model"),
    ],
)
def test_bad_input_is_one_line_error_with_nonzero_exit(tmp_path, args, message):
    result = run_cli(*args, "--library", str(tmp_path / "lib"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("myvlm: error:") and message in lines[0], result.stderr


def test_import_train_and_caption_with_a_local_model_folder(tmp_path, capsys):
    vlm = tiny_llava()
    model_dir = save(vlm, tmp_path / "tiny-llava")
    library = str(tmp_path / "lib")
    ConceptLibrary(library).create("Bobby", kind="object", class_word="dog")
    checkpoint = tmp_path / "concept_embeddings_llava_captioning.pt"
    vector = torch.randn(1, vlm.concept_width)
    torch.save({99: {"keys": torch.randn(1, 8), "values": vector}}, checkpoint)
    assert main(["import", str(checkpoint), "--concept", "Bobby", "--model", str(model_dir), "--library", library]) == 0
    stored = ConceptLibrary(library).load_embedding("Bobby", str(model_dir.resolve()), vlm.concept_width)
    assert torch.equal(stored, vector[0])

    folder = tmp_path / "bobby"
    folder.mkdir()
    for index, image in enumerate(photos(4)):
        image.save(folder / f"{index}.png")
    (folder / "captions.json").write_text(json.dumps({f"{i}.png": [f"Bobby is on the sofa {i} ."] for i in range(4)}))
    assert (
        main(
            [
                "train",
                "Bobby",
                "--model",
                str(model_dir),
                "--captions",
                str(folder / "captions.json"),
                "--steps",
                "3",
                "--library",
                library,
            ]
        )
        == 0
    )
    entry = ConceptLibrary(library).get("Bobby").embeddings[str(model_dir.resolve())]
    assert entry["steps"] == 3 and entry["source"] == "myvlm"

    report = tmp_path / "report.html"
    out = tmp_path / "captions.json"
    assert (
        main(
            [
                "caption",
                str(folder),
                "--model",
                str(model_dir),
                "--json",
                str(out),
                "--report",
                str(report),
                "--library",
                library,
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert [Path(r["image"]).name for r in rows] == ["0.png", "1.png", "2.png", "3.png"]
    assert all(r["concepts"] == [] for r in rows)  # this concept has no head: nothing is detected
    assert "<img src='data:image/jpeg;base64," in report.read_text()


def test_html_report_escapes_captions_and_file_names(tmp_path):
    from myvlm.report import write_report

    path = write_report(
        tmp_path / "r.html",
        "t<script>",
        ["caption"],
        [(photos(1)[0], "<img onerror=x>.png", ["<script>alert(1)</script>"], True)],
    )
    text = path.read_text()
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<img onerror" not in text


def test_text_similarity_uses_a_real_sentence_model():
    from myvlm.evaluate import text_similarity

    same, close, far = text_similarity(
        ["a dog sleeps on the sofa"] * 3,
        ["a dog sleeps on the sofa", "a puppy is sleeping on the couch", "quarterly earnings beat expectations"],
    )
    assert same == pytest.approx(1.0, abs=1e-5)
    assert close > 0.6 > 0.2 > far


def test_eval_reports_preservation_and_recall_from_the_heads(tmp_path, capsys):
    vlm = tiny_llava()
    model_dir = save(vlm, tmp_path / "tiny-llava")
    library = ConceptLibrary(tmp_path / "lib")
    library.create("Bobby", kind="object", class_word="dog")
    library.save_embedding("Bobby", str(model_dir.resolve()), torch.randn(vlm.concept_width))
    for folder, seed in (("pos", 0), ("neg", 1)):
        (tmp_path / folder).mkdir()
        for index, image in enumerate(photos(2, seed=seed)):
            image.save(tmp_path / folder / f"{index}.png")
    out = tmp_path / "metrics.json"
    args = ["eval", "--model", str(model_dir), "--concept", "Bobby", "--positives", str(tmp_path / "pos")]
    args += ["--negatives", str(tmp_path / "neg"), "--json", str(out), "--library", str(library.root)]
    assert main(args) == 0
    metrics = json.loads(out.read_text())
    # Without a head nothing is detected: captions equal the base ones, so nothing is named and all is preserved.
    assert metrics["recall"] == 0.0 and metrics["precision"] == 0.0 and metrics["preservation"] == 1.0
    assert metrics["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert (metrics["n_pos"], metrics["n_neg"]) == (2, 2)


@needs_photos
def test_person_enrolment_says_which_face_of_a_group_photo_and_refuses_two_people(tmp_path, capsys):
    library = str(tmp_path / "lib")
    faces = DATA / "faces"
    alice = [str(faces / "person_a" / "img1.jpg"), str(faces / "group" / "couple.jpg")]
    assert main(["concept", "add", "alice", "--kind", "person", "--images", *alice, "--library", library]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "enrolling the faces" not in line]
    assert (
        len(warning) == 1
        and warning[0].startswith("myvlm: warning: ")
        and "couple.jpg: 2 faces; enrolled face 1" in warning[0]
    )
    mixed = [str(faces / "person_a" / "img1.jpg"), str(faces / "person_b" / "img26.jpg")]
    assert main(["concept", "add", "bob", "--kind", "person", "--images", *mixed, "--library", library]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "enrolling the faces" not in line]
    assert len(error) == 1 and "these photos show 2 different people" in error[0]
    assert [c.name for c in ConceptLibrary(library).concepts()] == ["alice"]
