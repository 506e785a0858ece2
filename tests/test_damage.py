"""Issue #30: one damaged concept costs only itself.

A three-concept library (toy-llava embeddings, object heads on the toy world's CLIP that fire on every photo) is built
once; each case copies it, damages one file of one concept, and runs `concept list`, `detect`, `caption`, `concept
check`, a command naming the damaged concept and `concept remove`. The other two concepts must be served with one
warning line, `check` must name exactly the damaged one and why, and no file of the library may change but by remove.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import myvlm.library
from myvlm.cli import main
from myvlm.errors import MyVLMError
from myvlm.library import EMBEDDINGS, HEAD, MANIFEST, ConceptLibrary
from myvlm.toyworld import HEAD_ENCODER, render_scene, sample_scene

NAMES = ("alice", "bobby", "carol")
DAMAGED, HEALTHY = "bobby", ["alice", "carol"]
MODEL = "toy-llava"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, Path]:
    """(library, photo folder), built once: heads that always fire, random embeddings for toy-llava."""
    from myvlm.heads import ObjectHead
    from myvlm.model import load

    root = tmp_path_factory.mktemp("damage")
    library = ConceptLibrary(root / "lib")
    vlm = load(MODEL)
    width, dim = vlm.concept_width, vlm.vision_encoder.dim
    generator = torch.Generator().manual_seed(0)
    for name in NAMES:
        head = ObjectHead(torch.zeros(dim), torch.full((1,), 10.0), HEAD_ENCODER)  # p = sigmoid(10) on any photo
        library.create(name, kind="object", class_word="ball", head=head)
        library.save_embedding(name, MODEL, torch.randn(width, generator=generator), family="llava", task="caption")
    photos = root / "photos"
    photos.mkdir()
    for index in range(2):
        render_scene(sample_scene(index)).save(photos / f"scene_{index}.png")
    return library.root, photos


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the tensor data: the file still parses, only its checksum tells
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, **changes}))


DAMAGE = {  # case -> (damage done to the concept's folder, part of the reason `check` gives)
    "manifest-truncated": (lambda f: truncate(f / MANIFEST), "concept.json: corrupted JSON"),
    "manifest-invalid-json": (lambda f: (f / MANIFEST).write_text("{'name': 'bobby'}"), "concept.json: corrupted JSON"),
    "manifest-wrong-schema": (lambda f: edit_manifest(f, kind="ghost"), "corrupted manifest (kind 'ghost')"),
    "manifest-bad-checksum": (lambda f: edit_manifest(f, files={HEAD: "abc"}), "files must map tensor files"),
    "embeddings-truncated": (lambda f: truncate(f / EMBEDDINGS), f"{EMBEDDINGS}: damaged ("),
    "embeddings-flipped-byte": (lambda f: flip_last_byte(f / EMBEDDINGS), f"{EMBEDDINGS}: damaged (its sha256"),
    "head-truncated": (lambda f: truncate(f / HEAD), f"{HEAD}: damaged ("),
    "head-flipped-byte": (lambda f: flip_last_byte(f / HEAD), f"{HEAD}: damaged (its sha256"),
    "head-missing": (lambda f: (f / HEAD).unlink(), f"{HEAD}: missing"),
}


def snapshot(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every path under the library, hidden ones included, with each file's bytes and modification time."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def run(capsys, *args: str) -> tuple[int, str, list[str]]:
    """Exit code, stdout and the warning lines of one CLI call."""
    code = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, [line for line in err.splitlines() if line.startswith("myvlm: warning")]


def assert_one_warning(warnings: list[str], reason: str) -> None:
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"myvlm: warning: skipping concept '{DAMAGED}': ") and reason in warnings[0]
    assert f"run 'myvlm concept check {DAMAGED} --library " in warnings[0]
    assert f"remove it with 'myvlm concept remove {DAMAGED} --library " in warnings[0]


@pytest.mark.parametrize("case", DAMAGE)
def test_one_damaged_concept_costs_only_itself(case, template, tmp_path, capsys):
    lib, photos = tmp_path / "lib", template[1]
    shutil.copytree(template[0], lib)
    damage, reason = DAMAGE[case]
    damage(lib / DAMAGED)
    time.sleep(0.01)  # so that a rewrite within the same clock tick would still show in the modification times
    before = snapshot(lib)
    library = ["--library", str(lib)]

    code, out, warnings = run(capsys, "concept", "list", "--json", *library)
    rows = {row["name"]: row for row in json.loads(out)}
    assert code == 0 and [n for n in rows if rows[n]["status"] == "ok"] == HEALTHY
    assert rows[DAMAGED]["status"] == "damaged" and reason in rows[DAMAGED]["error"]
    assert_one_warning(warnings, reason)
    code, out, warnings = run(capsys, "concept", "list", *library)
    assert code == 0 and f"{DAMAGED:<20} DAMAGED " in out and reason in out
    assert_one_warning(warnings, reason)

    detections = tmp_path / "detections.json"
    code, _, warnings = run(capsys, "detect", str(photos), "--json", str(detections), *library)
    assert code == 0 and [[d["concept"] for d in row["detections"]] for row in json.loads(detections.read_text())] == [
        HEALTHY,
        HEALTHY,
    ]
    assert_one_warning(warnings, reason)

    captions = tmp_path / "captions.json"
    code, _, warnings = run(capsys, "caption", str(photos), "--model", MODEL, "--json", str(captions), *library)
    assert code == 0 and [row["concepts"] for row in json.loads(captions.read_text())] == [HEALTHY, HEALTHY]
    assert_one_warning(warnings, reason)

    code, out, warnings = run(capsys, "concept", "check", *library)
    lines = out.splitlines()
    assert code == 1 and not warnings
    assert [line.split()[:2] for line in lines[:3]] == [["alice", "ok"], [DAMAGED, "damaged:"], ["carol", "ok"]]
    assert reason in lines[1] and lines[3] == f"1 of 3 concepts damaged: {DAMAGED}"
    assert run(capsys, "concept", "check", "alice", "carol", *library)[0] == 0

    # A command that names the damaged concept fails with the one-line reason (before loading any model).
    assert main(["train", DAMAGED, "--model", MODEL, "--images", str(photos), *library]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("myvlm: error: ") and reason in error and "\n" not in error
    assert snapshot(lib) == before  # reading, checking and failing changed nothing

    # Writing to the rest of the library works and leaves the damaged concept as it is.
    ConceptLibrary(lib).create("dave", kind="object", identifier="Dave")
    ConceptLibrary(lib).save_embedding("alice", "another-model", torch.ones(4))
    assert {k: v for k, v in snapshot(lib).items() if k.startswith(DAMAGED)} == {
        k: v for k, v in before.items() if k.startswith(DAMAGED)
    }
    shutil.rmtree(lib / "dave")

    assert run(capsys, "concept", "remove", DAMAGED, *library)[0] == 0  # the way out
    assert run(capsys, "concept", "check", *library)[:2] == (0, "alice                ok\ncarol                ok\n")


def test_python_api_warns_once_and_named_access_raises(template, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(template[0], lib)
    flip_last_byte(lib / DAMAGED / EMBEDDINGS)
    library = ConceptLibrary(lib)
    with pytest.warns(myvlm.library.DamagedConceptWarning, match=f"skipping damaged concept '{DAMAGED}'") as caught:
        assert [c.name for c in library.concepts()] == HEALTHY
        assert [c.name for c in library.concepts()] == HEALTHY  # reported once per library object
    assert len(caught) == 1 and DAMAGED in library.damaged
    for read in (library.get, lambda name: library.load_embedding(name, MODEL)):
        with pytest.raises(MyVLMError, match=f"{EMBEDDINGS}: damaged"):
            read(DAMAGED)
    assert library.load_head(DAMAGED) is not None  # its head file is whole
    with pytest.raises(MyVLMError, match=f"{EMBEDDINGS}: damaged"):  # a write never builds on a damaged file
        library.save_embedding(DAMAGED, "other-model", torch.ones(4))
    with pytest.raises(MyVLMError, match="no concept named 'nobody'"):
        library.check("nobody")


def test_concepts_of_earlier_versions_load_without_checksums(template, tmp_path, capsys):
    lib = tmp_path / "lib"
    shutil.copytree(template[0], lib)
    for name in NAMES:
        manifest = json.loads((lib / name / MANIFEST).read_text())
        del manifest["files"]
        (lib / name / MANIFEST).write_text(json.dumps(manifest))
    library = ConceptLibrary(lib, on_damage=lambda name, error: pytest.fail(f"{name}: {error}"))
    assert [c.name for c in library.concepts()] == list(NAMES)
    assert library.load_head("alice") is not None and library.load_embedding("alice", MODEL).numel() > 0
    code, out, _ = run(capsys, "concept", "check", "--library", str(lib))
    assert code == 0 and out.count(f"ok (no checksum for {EMBEDDINGS} and {HEAD}: written by an earlier myvlm") == 3
    library.save_embedding("alice", "another-model", torch.ones(4))  # a new write records the file it writes
    assert library.check("alice").unchecked == [HEAD]


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_before", [0, 1, 2], ids=["manifest-1", "tensor-file", "manifest-2"])
def test_a_crash_between_the_writes_of_a_save_never_leaves_a_checksum_mismatch(tmp_path, monkeypatch, crash_before):
    """save_embedding writes the manifest (accepting old or new file), the file, then the manifest (new file only);
    stopped before any of the three, the concept reads as whole, with the old or the new vector."""
    library = ConceptLibrary(tmp_path / "lib")
    library.create("Bobby", kind="object")
    library.save_embedding("Bobby", "m", torch.ones(8))
    writes = []

    def crashing(write):
        def wrapped(path, data):
            if len(writes) == crash_before:
                raise Crash(path.name)
            writes.append(path.name)
            write(path, data)

        return wrapped

    monkeypatch.setattr(myvlm.library, "write_json_atomic", crashing(myvlm.library.write_json_atomic))
    monkeypatch.setattr(myvlm.library, "write_bytes_atomic", crashing(myvlm.library.write_bytes_atomic))
    with pytest.raises(Crash):
        library.save_embedding("Bobby", "m", torch.full((8,), 2.0))
    assert writes == [MANIFEST, EMBEDDINGS, MANIFEST][:crash_before]
    monkeypatch.undo()
    assert library.check("Bobby").ok, library.check("Bobby").error
    assert library.load_embedding("Bobby", "m")[0].item() == (1.0 if crash_before < 2 else 2.0)
    library.save_embedding("Bobby", "m", torch.full((8,), 3.0))
    assert library.check("Bobby").ok and library.load_embedding("Bobby", "m")[0].item() == 3.0
    assert "next" not in json.dumps(json.loads((tmp_path / "lib" / "Bobby" / MANIFEST).read_text())["files"])


def test_a_reader_racing_a_writer_never_sees_damage(tmp_path):
    """Readers take no lock: one that reads the manifest before a save and the tensor file after it reads the
    manifest again instead of calling the concept damaged."""
    library = ConceptLibrary(tmp_path / "lib")
    library.create("Bobby", kind="object")
    library.save_embedding("Bobby", "m", torch.zeros(64))
    pid = os.fork()
    if pid == 0:  # the writer: never returns into pytest
        code = 1
        try:
            for index in range(60):
                ConceptLibrary(tmp_path / "lib").save_embedding("Bobby", f"m{index % 3}", torch.full((64,), index))
            code = 0
        finally:
            os._exit(code)
    reads, done = 0, 0
    while not done:
        done, exit_status = os.waitpid(pid, os.WNOHANG)
        status = library.check("Bobby")
        assert status.ok, status.error
        reads += 1
    assert exit_status == 0 and reads > 10


@pytest.fixture(scope="module")
def small_concept(tmp_path_factory) -> Path:
    from myvlm.heads import FaceHead

    library = ConceptLibrary(tmp_path_factory.mktemp("fuzz") / "lib")
    library.create("Ann", kind="person", head=FaceHead(torch.ones(2, 128), threshold=0.5))
    library.save_embedding("Ann", "m", torch.ones(16))
    library.save_embedding("Ann", "n", torch.ones(8))
    return library.root / "Ann"


@settings(deadline=None, derandomize=True, database=None, max_examples=300, suppress_health_check=list(HealthCheck))
@given(
    filename=st.sampled_from([EMBEDDINGS, HEAD, MANIFEST]),
    edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.none() | st.integers(0, 4095),
    checksums=st.booleans(),
)
def test_fuzz_a_mutated_file_damages_its_concept_and_nothing_else(small_concept, filename, edits, cut, checksums):
    """Whatever the bytes, a scan reports a status and never raises; with checksums, changed tensors are damage."""
    original = {name: (small_concept / name).read_bytes() for name in (EMBEDDINGS, HEAD, MANIFEST)}
    try:
        if not checksums:
            manifest = json.loads(original[MANIFEST])
            del manifest["files"]
            (small_concept / MANIFEST).write_text(json.dumps(manifest))
        data = bytearray((small_concept / filename).read_bytes())
        for position, value in edits:
            data[position % len(data)] = value
        data = bytes(data[:cut])
        (small_concept / filename).write_bytes(data)
        [status] = ConceptLibrary(small_concept.parent).scan()
        assert status.ok or status.error.startswith(str(small_concept)) or status.error.startswith("concept 'Ann'")
        if checksums and filename != MANIFEST and data != original[filename]:
            assert not status.ok
    finally:
        for name, content in original.items():
            (small_concept / name).write_bytes(content)
