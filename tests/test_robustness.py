"""Issue #7: messy photos, bad concepts, interrupted training, crashes and hostile files.

Every case goes through the real code: the CLI (`main([...])`, whose errors must be one line and exit code 2) or the
public API. The fuzz test feeds load_image thousands of mutated files; the kill test SIGKILLs writers at random points.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import signal
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

import myvlm
import myvlm.personalize
from myvlm.cli import main
from myvlm.errors import MyVLMError
from myvlm.images import MAX_PIXELS, collect_images, load_image
from myvlm.library import EMBEDDINGS, HEAD, MANIFEST, ConceptLibrary
from myvlm.personalize import train_concept
from tiny_vlms import photos, save, tiny_llava

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_photos = pytest.mark.skipif(not DATA.is_dir(), reason=f"real photos not found at {DATA}")


def cli_error(capsys, *args: str) -> str:
    """Run the CLI expecting a user error; return its one error line, the last on stderr (before it: progress bars
    of transformers and 'skipping' lines of a batch)."""
    assert main(list(args)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("myvlm: error: ")]
    assert errors == lines[-1:] and not any("Traceback" in line for line in lines), lines
    return errors[0]


def image_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds no pixels: what a decompression bomb's header looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


RED, BLUE = (220, 20, 20), (20, 20, 220)


# --- 1. image input ------------------------------------------------------------------------------------------------
def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return image_bytes(Image.new("RGB", (40, 20), RED), "JPEG", exif=exif)


def sixteen_bit_png() -> bytes:
    pixels = np.array([[0, 65535] * 8, [32768, 0] * 8] * 8, dtype=np.uint16)
    return image_bytes(Image.fromarray(pixels), "PNG")


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), color) for color in (RED, BLUE)]
    return image_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def transparent_rgba() -> bytes:
    pixels = np.zeros((16, 16, 4), dtype=np.uint8)  # fully transparent black
    pixels[:8, :, :] = (*BLUE, 255)
    return image_bytes(Image.fromarray(pixels), "PNG")


def palette_with_transparency() -> bytes:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([*RED, *BLUE] + [0] * 762)
    return image_bytes(image, "PNG", transparency=0)


WORKING = {  # file name -> (bytes, expected size, expected color of pixel (0, 0) or None)
    "cmyk.jpg": (lambda: image_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), (16, 16), RED),
    "rgba.png": (transparent_rgba, (16, 16), BLUE),
    "la.png": (lambda: image_bytes(Image.new("LA", (16, 16), (128, 0)), "PNG"), (16, 16), (255, 255, 255)),
    "palette.png": (palette_with_transparency, (16, 16), (255, 255, 255)),
    "16bit.png": (sixteen_bit_png, (16, 16), (0, 0, 0)),
    "rotated.jpg": (exif_rotated_jpeg, (20, 40), RED),
    "animated.gif": (lambda: animated("GIF"), (16, 16), RED),
    "animated.webp": (lambda: animated("WEBP"), (16, 16), RED),
    "tiny-8px.png": (lambda: image_bytes(Image.new("RGB", (8, 8), RED), "PNG"), (8, 8), RED),
    "bilevel.bmp": (lambda: image_bytes(Image.new("1", (16, 16), 1), "BMP"), (16, 16), (255, 255, 255)),
    "float.tif": (lambda: image_bytes(Image.new("F", (16, 16), 300.0), "TIFF"), (16, 16), (255, 255, 255)),
}


@pytest.mark.parametrize("name", WORKING)
def test_unusual_but_valid_images_load_as_rgb(tmp_path, name):
    if name.endswith(".webp") and not features.check("webp"):
        pytest.skip("Pillow was built without WebP")
    make, size, color = WORKING[name]
    image = load_image(write(tmp_path / name, make()))
    assert image.mode == "RGB" and image.size == size
    assert np.allclose(image.getpixel((0, 0)), color, atol=40), image.getpixel((0, 0))


def test_sixteen_bit_image_keeps_its_contrast(tmp_path):
    image = load_image(write(tmp_path / "16bit.png", sixteen_bit_png()))
    assert image.getpixel((1, 0)) == (255, 255, 255) and 120 <= image.getpixel((0, 1))[0] <= 135


BROKEN = {  # file name -> (bytes, part of the one-line error)
    "random.jpg": (lambda: bytes(random.Random(0).randrange(256) for _ in range(500)), "not an image"),
    "notes.png": (lambda: b"shopping list: milk, eggs\n", "not an image"),
    "empty.jpg": (lambda: b"", "not an image"),
    "truncated.jpg": (lambda: image_bytes(photos(1, size=64)[0], "JPEG")[:300], "corrupt or truncated"),
    "truncated.png": (lambda: image_bytes(photos(1, size=64)[0], "PNG")[:200], "corrupt or truncated"),
    "tiny-4px.png": (lambda: image_bytes(Image.new("RGB", (4, 30)), "PNG"), "4x30, too small"),
    "huge.png": (lambda: png_header_only(9000, 9000), f"over the {MAX_PIXELS:,}-pixel limit"),
    "bomb.png": (lambda: png_header_only(40000, 40000), "possible decompression bomb"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_broken_images_raise_one_line_naming_the_file(tmp_path, name):
    make, message = BROKEN[name]
    path = write(tmp_path / name, make())
    with pytest.raises(MyVLMError) as caught:
        load_image(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def test_missing_path_folder_and_fifo_are_named(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    for path, message in [("gone.jpg", "no such file"), (".", "is a folder"), ("pipe.jpg", "not a regular file")]:
        with pytest.raises(MyVLMError, match=f"{tmp_path / path}: {message}"):
            load_image(tmp_path / path)


def unreadable_file(tmp_path) -> Path:
    """A file this process may not read. As root, chmod does not stop reads, but a write-only sysfs file does."""
    if os.geteuid() != 0:
        path = write(tmp_path / "secret.jpg", b"x")
        path.chmod(0)
        return path
    for candidate in ("/sys/bus/pci/rescan", "/sys/kernel/mm/ksm/run"):
        path = Path(candidate)
        try:
            path.read_bytes()
        except PermissionError:
            return path
        except OSError:
            continue
    pytest.skip("running as root and no unreadable file found to test 'permission denied'")


def test_unreadable_file_says_permission_denied(tmp_path):
    path = unreadable_file(tmp_path)
    with pytest.raises(MyVLMError, match=f"^{path}: permission denied$"):
        load_image(path)


def test_empty_folder_and_folder_without_images(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("no photos here")
    for folder in ("empty", "docs"):
        with pytest.raises(MyVLMError, match="no images found"):
            collect_images([tmp_path / folder])
    line = cli_error(
        capsys,
        "concept",
        "add",
        "Rex",
        "--kind",
        "object",
        "--images",
        str(tmp_path / "empty"),
        "--library",
        str(tmp_path / "lib"),
    )
    assert f"no images found in {tmp_path / 'empty'}" in line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save(tiny_llava(), tmp_path_factory.mktemp("model") / "tiny-llava")


def test_batch_reports_and_skips_bad_files_and_escapes_names_in_the_report(tmp_path, model_dir, capsys):
    folder = tmp_path / "holiday"
    folder.mkdir()
    good = ["<img src=x onerror=alert(1)>.png", "tiny-16px.png", "b.jpg"]
    photos(1)[0].save(folder / good[0])
    Image.new("RGB", (16, 16), RED).save(folder / good[1])  # below the model's 32 px: the processor upscales it
    photos(1, seed=1)[0].save(folder / good[2])
    write(folder / "broken.jpg", b"\xff\xd8\xff garbage")
    write(folder / "two\nlines.png", b"")  # a line break in a file name must not split the message
    out, report = tmp_path / "captions.json", tmp_path / "report.html"
    args = [
        "caption",
        str(folder),
        str(tmp_path / "missing.jpg"),
        "--model",
        str(model_dir),
        "--json",
        str(out),
        "--report",
        str(report),
        "--library",
        str(tmp_path / "lib"),
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"myvlm: skipping {folder / 'broken.jpg'}: not an image" in err
    assert f"myvlm: skipping {tmp_path / 'missing.jpg'}: no such file" in err
    assert f"myvlm: skipping {folder / 'two lines.png'}: not an image" in err
    assert sorted(Path(row["image"]).name for row in json.loads(out.read_text())) == sorted(good)
    html = report.read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;.png" in html


def test_single_bad_file_or_batch_of_only_bad_files_fails(tmp_path, model_dir, capsys):
    bad = write(tmp_path / "bad.png", b"not a png")
    line = cli_error(capsys, "caption", str(bad), "--model", str(model_dir), "--library", str(tmp_path / "lib"))
    assert f"{bad}: not an image" in line  # one line, with the reason
    line = cli_error(capsys, "ask", str(bad), "what?", "--model", str(model_dir), "--library", str(tmp_path / "lib"))
    assert f"{bad}: not an image" in line


def test_python_api_misuse_is_one_clear_error(model_dir):
    """Wrong argument shapes to caption / ask / learn fail in one line naming the mistake, not as a KeyError, an
    IndexError or a ZeroDivisionError from deep inside (a bare name was read letter by letter)."""
    vlm = myvlm.load(str(model_dir))
    vlm.add_concept("bobby", "Bobby", torch.randn(vlm.concept_width))
    image, one_step = photos(1)[0], myvlm.TrainingConfig(steps=1)
    misuse = {
        "has no embedding": lambda: vlm.caption([image], concepts=[["nope"]]),
        r"as a list of names, e.g. \[\['bobby'\]\]": lambda: vlm.caption([image], concepts=["bobby"]),
        r"as a list of names, e.g. \['bobby'\]": lambda: vlm.ask(image, "What is it ?", concepts="bobby"),
        "give a list of images": lambda: vlm.caption(image),
        "image 0 is a str, not a PIL image": lambda: vlm.caption(["photo.png"]),
        r"image 0 is empty \(0x0 pixels\)": lambda: vlm.caption([Image.new("RGB", (0, 0))]),
        "must be at least 1": lambda: vlm.caption([image], max_new_tokens=0),
        "NaN or infinite": lambda: vlm.add_concept("n", "N", torch.full((vlm.concept_width,), float("nan"))),
        "identifier .* is empty": lambda: vlm.add_concept("n", " ", torch.randn(vlm.concept_width)),
        r"one list of captions per image \(1 images, 2 entries\)": lambda: vlm.learn(
            "b", "Bobby", [image], [["Bobby ."], ["Bobby ."]], one_step, progress=False
        ),
        r"one list of captions per image \(1 images, 1 entries\)": lambda: vlm.learn(
            "b", "Bobby", [image], ["Bobby ."], one_step, progress=False
        ),
    }
    for message, call in misuse.items():
        with pytest.raises(MyVLMError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


# --- 2. concepts ----------------------------------------------------------------------------------------------------
@pytest.fixture
def lib(tmp_path) -> str:
    return str(tmp_path / "lib")


@pytest.fixture
def dog_photos(tmp_path) -> list[str]:
    paths = []
    for index, image in enumerate(photos(3, seed=7)):
        image.save(tmp_path / f"dog{index}.png")
        paths.append(str(tmp_path / f"dog{index}.png"))
    return paths


@needs_photos
def test_enrolment_photo_without_a_face_is_named(lib, capsys):
    giraffe = DATA / "negatives" / "giraffe.jpg"
    line = cli_error(
        capsys,
        "concept",
        "add",
        "Ann",
        "--kind",
        "person",
        "--images",
        str(DATA / "faces" / "person_a" / "img1.jpg"),
        str(giraffe),
        "--library",
        lib,
    )
    assert f"{giraffe}: no face found" in line
    assert ConceptLibrary(lib).concepts() == []


@needs_photos
def test_enrolment_photo_with_several_faces_keeps_the_largest(lib, capsys):
    couple = DATA / "faces" / "group" / "couple.jpg"
    assert main(["concept", "add", "Ann", "--kind", "person", "--images", str(couple), "--library", lib]) == 0
    head = ConceptLibrary(lib).load_head("Ann")
    assert head.descriptors.shape[0] == 1  # one face per enrolment photo: the largest


def test_too_few_photos(tmp_path, lib, capsys):
    from myvlm.heads import FaceHead, ObjectHead

    for make in (lambda: FaceHead.enroll([]), lambda: ObjectHead.train([])):
        with pytest.raises(MyVLMError, match="needs at least one photo|no photos given"):
            make()
    (tmp_path / "empty").mkdir()
    line = cli_error(
        capsys, "concept", "add", "Ann", "--kind", "person", "--images", str(tmp_path / "empty"), "--library", lib
    )
    assert "no images found" in line


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "concept name is empty"),
        ("   ", "concept name is empty"),
        ("x" * 65, "is too long (65 > 64 characters)"),
        ("a/b", "may not contain path separators or '..'"),
        ("a\\b", "may not contain path separators or '..'"),
        ("..", "may not contain path separators or '..'"),
        ("../../etc", "may not contain path separators or '..'"),
        (".hidden", "must start with a letter or digit"),
        ("Rex\nDog", "must start with a letter or digit"),
    ],
)
def test_bad_concept_names(lib, dog_photos, capsys, name, message):
    line = cli_error(capsys, "concept", "add", name, "--kind", "object", "--images", *dog_photos, "--library", lib)
    assert message in line
    with pytest.raises(MyVLMError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ConceptLibrary(lib).create(name, kind="object")
    assert not Path(lib).exists() or not any(p for p in Path(lib).iterdir() if not p.name.startswith("."))


def test_duplicate_name_and_identifier_clash(lib, capsys):
    library = ConceptLibrary(lib)
    library.create("Rex", kind="object", identifier="sks", class_word="dog")
    with pytest.raises(MyVLMError, match="a concept named 'Rex' already exists"):
        library.create("rex", kind="object")  # names differ only by case: one folder on macOS and Windows
    with pytest.raises(MyVLMError, match="identifier 'SKS' is already used by concept 'Rex'"):
        library.create("Max", kind="object", identifier="SKS")
    assert "already exists" in cli_error(
        capsys, "concept", "add", "Rex", "--kind", "object", "--images", "x.jpg", "--library", lib
    )
    assert [c.name for c in library.concepts()] == ["Rex"]


def bobby_folder(tmp_path: Path, captions: dict | None) -> Path:
    folder = tmp_path / "bobby"
    folder.mkdir(exist_ok=True)
    for index, image in enumerate(photos(4)):
        image.save(folder / f"{index}.png")
    if captions is not None:
        (folder / "captions.json").write_text(json.dumps(captions))
    return folder


@pytest.mark.parametrize(
    ("captions", "class_word", "message"),
    [
        ({f"{i}.png": "a dog on the sofa ." for i in range(4)}, "dog", "0.png: no caption mentions 'Bobby'"),
        ({"0.png": "Bobby is on the sofa ."}, "dog", "1.png: no captions for this photo"),
        ({"0.png": "Bobby .", "9.png": "Bobby ."}, "dog", "9.png: listed in"),
        (None, "giraffe", "0.png: the base caption"),  # the base model never says 'giraffe'
        (None, None, "no class word; give --captions, or set it with `myvlm concept edit Bobby --class-word WORD`"),
    ],
)
def test_captions_without_identifier_or_class_word(tmp_path, lib, model_dir, capsys, captions, class_word, message):
    ConceptLibrary(lib).create("Bobby", kind="object", class_word=class_word)
    folder = bobby_folder(tmp_path, captions)
    source = ["--captions", str(folder / "captions.json")] if message.startswith("9.png") else ["--images", str(folder)]
    line = cli_error(capsys, "train", "Bobby", "--model", str(model_dir), *source, "--steps", "2", "--library", lib)
    assert message in line
    assert ConceptLibrary(lib).get("Bobby").embeddings == {}


def test_concept_trained_for_another_model_or_width(tmp_path, lib, model_dir, capsys):
    vlm = tiny_llava()
    library = ConceptLibrary(lib)
    library.create("Bobby", kind="object", class_word="dog")
    library.save_embedding("Bobby", "some/other-model", torch.ones(vlm.concept_width))
    assert library.load_embedding("Bobby", vlm.model_id) is None
    assert vlm.use_library(library) == []  # trained for another model: not loaded, not an error
    photo = tmp_path / "photo.png"
    photos(1)[0].save(photo)
    assert main(["caption", str(photo), "--model", str(model_dir), "--library", lib]) == 0
    assert "myvlm: note: not trained for" in capsys.readouterr().err  # but the user is told
    library.save_embedding("Bobby", vlm.model_id, torch.ones(vlm.concept_width + 1))
    with pytest.raises(MyVLMError, match=f"concept 'Bobby': stored embedding for {vlm.model_id} has width"):
        vlm.use_library(library)
    checkpoint = tmp_path / "concept_embeddings_llava_captioning.pt"
    torch.save({9: {"keys": torch.ones(1, 4), "values": torch.ones(1, 7)}}, checkpoint)
    line = cli_error(
        capsys, "import", str(checkpoint), "--concept", "Bobby", "--model", str(model_dir), "--library", lib
    )
    assert "7" in line and str(vlm.concept_width) in line


def concept_with_embedding(lib: str, width: int = 8) -> ConceptLibrary:
    library = ConceptLibrary(lib)
    library.create("Bobby", kind="object", class_word="dog")
    library.save_embedding("Bobby", "m", torch.ones(width))
    return library


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: b"{not json", "corrupted JSON"),
        (lambda m: b"\xff\xfe\x00", "corrupted JSON"),
        (lambda m: b"[1, 2]", "corrupted (expected a JSON object)"),
        (lambda m: b"[" * 100_000, "corrupted JSON"),
        (lambda m: json.dumps({**m, "format": "other/9"}).encode(), "not a myvlm concept manifest"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "kind"}).encode(), "missing kind"),
        (lambda m: json.dumps({**m, "kind": "ghost"}).encode(), "kind 'ghost'"),
        (lambda m: json.dumps({**m, "name": "../../etc"}).encode(), "may not contain path separators"),
        (lambda m: json.dumps({**m, "name": "Other"}).encode(), "does not match its folder"),
        (lambda m: json.dumps({**m, "embeddings": ["ab"]}).encode(), "embeddings must map model ids"),
        (lambda m: json.dumps({**m, "head": "face"}).encode(), "head or class_word has the wrong type"),
    ],
    ids=[
        "syntax",
        "not-utf8",
        "not-an-object",
        "too-deep",
        "format",
        "missing-field",
        "kind",
        "name-escapes",
        "name-mismatch",
        "embeddings-type",
        "head-type",
    ],
)
def test_corrupted_manifest_is_named_and_removable(lib, capsys, damage, message):
    library = concept_with_embedding(lib)
    manifest = Path(lib) / "Bobby" / MANIFEST
    manifest.write_bytes(damage(json.loads(manifest.read_text())))
    assert main(["concept", "list", "--library", lib]) == 0  # the rest of the library stays usable (issue #30)
    assert capsys.readouterr().err.startswith("myvlm: warning: skipping concept 'Bobby': ")
    line = cli_error(capsys, "import", "x.pt", "--concept", "Bobby", "--model", "m", "--library", lib)
    assert f"{manifest}: " in line and message in line  # naming the damaged concept is an error
    assert main(["concept", "remove", "Bobby", "--library", lib]) == 0  # the way out
    assert library.concepts() == []


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (b"", "corrupted tensor file"),
        (b"\x00" * 7, "corrupted tensor file"),
        (b"\xff" * 8 + b"{}", "corrupted tensor file"),
        (None, "embeddings file lacks the vector for m"),
        (torch.full((8,), float("nan")), "is not finite"),
    ],
    ids=["empty", "too-short", "bad-header", "vector-missing", "nan-vector"],
)
@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "earlier-version"])
def test_corrupted_tensor_file(lib, damage, message, checksums):
    from safetensors.torch import save

    library = concept_with_embedding(lib)
    if not checksums:
        forget_checksums(Path(lib) / "Bobby")
    path = Path(lib) / "Bobby" / EMBEDDINGS
    if damage is None:
        damage = save({"other": torch.ones(8)})
    elif isinstance(damage, torch.Tensor):
        damage = save({"m": damage})
    path.write_bytes(damage)
    with pytest.raises(MyVLMError, match=f"{path}: damaged" if checksums else message):
        library.load_embedding("Bobby", "m")


def forget_checksums(folder: Path) -> None:
    """Make the concept look written by a myvlm before issue #30: no checksums in its manifest."""
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["files"]
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "earlier-version"])
def test_corrupted_head_tensors(lib, checksums):
    from myvlm.heads import FaceHead

    library = ConceptLibrary(lib)
    library.create("Ann", kind="person", head=FaceHead(torch.ones(1, 128), threshold=0.5))
    if not checksums:
        forget_checksums(Path(lib) / "Ann")
    from safetensors.torch import save

    path = Path(lib) / "Ann" / HEAD
    path.write_bytes(save({"wrong": torch.ones(2)}))
    with pytest.raises(MyVLMError, match=f"{path}: damaged" if checksums else f"{path}: corrupted concept head"):
        library.load_head("Ann")
    path.write_bytes(save({"descriptors": torch.ones(2, 128)}))  # loads, but holds 2 faces where 1 was enrolled
    with pytest.raises(MyVLMError, match=f"{path}: damaged" if checksums else "faces 2, the manifest says 1"):
        library.load_head("Ann")


def test_training_together_explains_what_is_missing_and_never_loses_an_embedding(tmp_path, lib, model_dir, capsys):
    library = ConceptLibrary(lib)
    for name in ("Bobby", "Alice"):
        library.create(name, kind="object")
    folder = bobby_folder(tmp_path, None)
    captions = folder / "captions.json"

    def write_captions(mapping: dict) -> str:
        captions.write_text(json.dumps(mapping))
        return str(captions)

    good = {"0.png": "Bobby and Alice are on the sofa .", "1.png": "Alice is on the table .", "2.png": "Bobby ."}
    train = ["train", "Bobby", "Alice", "--model", str(model_dir), "--steps", "2", "--library", lib]
    assert "needs --captions naming them in each photo" in cli_error(capsys, *train)
    given = ["--captions", write_captions(good)]
    assert "takes captions only, not --images" in cli_error(capsys, *train, *given, "--images", str(folder))
    assert "takes captions only, not --task vqa" in cli_error(capsys, *train, *given, "--task", "vqa")
    assert "concept 'Bobby' has no embedding for" in cli_error(capsys, *train, *given)
    write_captions({**good, "3.png": "a dog ."})
    assert "3.png: no caption names any of 'Bobby', 'Alice'" in cli_error(capsys, *train, *given)
    write_captions({"0.png": "Bobby .", "1.png": "Alice ."})
    assert "no photo's caption names two of the concepts" in cli_error(capsys, *train, *given)
    write_captions({"0.png": ["Bobby and Alice .", "Alice ."], "1.png": ["Bobby .", "Alice ."]})
    assert "1.png: its captions name different concepts" in cli_error(capsys, *train, *given)
    assert "each concept may be named once" in cli_error(capsys, *train[:2], "Bobby", *train[3:], "--captions", "x")
    line = cli_error(capsys, "train", "Bobby", "--model", str(model_dir), "--captions", "a.json", "b.json")
    assert "one captions file per concept" in line
    alone = ["--steps", "2", "--library", lib]
    for name in ("Bobby", "Alice"):
        write_captions({f"{i}.png": f"{name} is on the sofa ." for i in range(4)})
        assert main(["train", name, "--model", str(model_dir), "--captions", str(captions), *alone]) == 0
    stored = {n: library.load_embedding(n, str(model_dir.resolve())) for n in ("Bobby", "Alice")}
    write_captions({"0.png": "Bobby and Alice are on the sofa .", "1.png": "Bobby .", "2.png": "Alice ."})
    capsys.readouterr()
    assert main([*train, "--captions", str(captions)]) == 0
    out = capsys.readouterr().out
    entries = ConceptLibrary(lib).get("Bobby").embeddings[str(model_dir.resolve())]
    if "kept the embeddings trained alone" in out:  # the tiny random model names nothing either way
        assert "together" not in entries
        for name, vector in stored.items():
            assert torch.equal(ConceptLibrary(lib).load_embedding(name, str(model_dir.resolve())), vector)
    else:
        assert entries["together"]["with"] == ["Alice"] and entries["steps"] == 2, entries
        assert main(["concept", "list", "--library", lib]) == 0
        assert "(trained with Alice)" in capsys.readouterr().out


# --- 3. training ----------------------------------------------------------------------------------------------------
def fail_on_call(monkeypatch, vlm_class_backend, call: int, outcome):
    """Make the backend's training loss return NaN (or raise) from its `call`-th call on."""
    original = vlm_class_backend.cached_loss
    calls = [0]

    def cached_loss(self, batch, views):
        calls[0] += 1
        loss = original(self, batch, views)
        if calls[0] < call:
            return loss
        if isinstance(outcome, BaseException):
            raise outcome
        return loss * outcome

    monkeypatch.setattr(vlm_class_backend, "cached_loss", cached_loss)


def test_nan_loss_stops_training_and_keeps_the_last_good_embedding(tmp_path, lib, monkeypatch, capsys):
    vlm = tiny_llava()
    library = ConceptLibrary(lib)
    library.create("Bobby", kind="object")
    folder = bobby_folder(tmp_path, {f"{i}.png": "Bobby is on the sofa ." for i in range(4)})
    fail_on_call(monkeypatch, type(vlm.backend), 4, float("nan"))
    done = train_concept(library, "Bobby", vlm.model_id, images=[str(folder)], steps=6, vlm=vlm)
    entry = library.get("Bobby").embeddings[vlm.model_id]
    assert entry["steps"] == 3 and "loss became nan at step 3" in entry["stopped_early"]
    assert torch.isfinite(library.load_embedding("Bobby", vlm.model_id, vlm.concept_width)).all()
    assert done.steps == 3 and "kept the last finite embedding" in done.stopped_early
    fail_on_call(monkeypatch, type(vlm.backend), 1, float("inf"))
    with pytest.raises(MyVLMError, match="failed at the first step"):
        train_concept(library, "Bobby", vlm.model_id, images=[str(folder)], steps=6, vlm=vlm)


@pytest.fixture
def checkpoint_every(monkeypatch) -> int:
    """Checkpoint every 2 steps, so a few tiny-model steps cover what 100 real ones do."""
    monkeypatch.setattr(myvlm.personalize, "CHECKPOINT_EVERY", 2)
    return 2


def test_ctrl_c_keeps_the_best_embedding_and_training_resumes(
    tmp_path, lib, model_dir, monkeypatch, capsys, checkpoint_every
):
    ConceptLibrary(lib).create("Bobby", kind="object")
    folder = bobby_folder(tmp_path, {f"{i}.png": "Bobby is on the sofa ." for i in range(4)})
    from myvlm.backends.llava import LlavaBackend

    steps = checkpoint_every + 3
    fail_on_call(monkeypatch, LlavaBackend, checkpoint_every + 2, KeyboardInterrupt())
    train = ["train", "Bobby", "--model", str(model_dir), "--images", str(folder), "--library", lib]
    assert main([*train, "--steps", str(steps)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("myvlm: interrupted; kept the best embedding of 'Bobby'"), err
    model_id = str(model_dir.resolve())
    entry = ConceptLibrary(lib).get("Bobby").embeddings[model_id]
    assert entry["complete"] is False and entry["steps"] <= checkpoint_every + 1
    assert main(["concept", "list", "--library", lib]) == 0
    assert f"interrupted at step {entry['steps']}" in capsys.readouterr().out

    monkeypatch.undo()
    assert main([*train, "--steps", str(steps), "--resume"]) == 0
    entry = ConceptLibrary(lib).get("Bobby").embeddings[model_id]
    assert entry["complete"] is True and entry["steps"] == steps
    line = cli_error(capsys, *train, "--steps", str(steps), "--resume")
    assert "has a finished embedding" in line


def test_a_crash_mid_training_leaves_a_periodic_checkpoint_to_resume_from(tmp_path, lib, monkeypatch, checkpoint_every):
    vlm = tiny_llava()
    library = ConceptLibrary(lib)
    library.create("Bobby", kind="object")
    folder = bobby_folder(tmp_path, {f"{i}.png": "Bobby is on the sofa ." for i in range(4)})
    fail_on_call(monkeypatch, type(vlm.backend), checkpoint_every + 2, RuntimeError("power cut"))
    with pytest.raises(RuntimeError, match="power cut"):  # no handler ran: only the periodic save is there
        train_concept(library, "Bobby", vlm.model_id, images=[str(folder)], steps=6, vlm=vlm)
    entry = library.get("Bobby").embeddings[vlm.model_id]
    assert entry["complete"] is False and entry["steps"] < checkpoint_every
    monkeypatch.undo()
    train_concept(library, "Bobby", vlm.model_id, images=[str(folder)], steps=6, resume=True, vlm=vlm)
    entry = library.get("Bobby").embeddings[vlm.model_id]
    assert entry["complete"] is True and entry["steps"] == 6


def test_resume_without_an_interrupted_training(tmp_path, lib, model_dir, capsys):
    ConceptLibrary(lib).create("Bobby", kind="object")
    folder = bobby_folder(tmp_path, {f"{i}.png": "Bobby ." for i in range(4)})
    line = cli_error(
        capsys, "train", "Bobby", "--model", str(model_dir), "--images", str(folder), "--resume", "--library", lib
    )
    assert "has no interrupted training" in line


@pytest.mark.parametrize(
    "args",
    [["train", "Bobby", "--model", "m", "--steps", "0"], ["caption", "x.jpg", "--model", "m", "--batch-size", "0"]],
)
def test_non_positive_counts_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


# --- 4. storage -----------------------------------------------------------------------------------------------------
def hidden_leftovers(root: Path) -> list[Path]:
    return [p for p in [*root.glob(".*"), *root.glob("*/.*")] if p.name != ".lock"]


def writer_loop(root: str, seed: int) -> None:
    """What a killed process was doing: create, save embeddings for two models, sometimes remove."""
    rng = random.Random(seed)
    library = ConceptLibrary(root)
    for index in range(10_000):
        name = f"c{rng.randrange(6)}"
        if name not in library:
            library.create(name, kind="object", class_word="dog")
        library.save_embedding(name, f"model-{index % 2}", torch.full((64,), float(index)))
        if rng.random() < 0.2:
            library.remove(name)


def fork(target, *args) -> int:
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            target(*args)
            code = 0
        finally:
            os._exit(code)
    return pid


def test_killing_a_writer_at_random_points_leaves_the_library_loadable(tmp_path):
    root = tmp_path / "lib"
    rng = random.Random(7)
    for kill in range(20):
        pid = fork(writer_loop, str(root), kill)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        library = ConceptLibrary(root)
        assert [s.error for s in library.scan() if not s.ok] == []  # checksums match: the manifest commits a write
        for concept in library.concepts():
            for model_id in concept.embeddings:
                vector = library.load_embedding(concept.name, model_id, 64)
                assert torch.all(vector == vector[0])  # one whole vector, never a mix of two writes
    ConceptLibrary(root).create("after", kind="object")  # the next locked write cleans what the kills left
    assert hidden_leftovers(root) == []


def test_two_writers_at_once_are_serialized(tmp_path):
    root = tmp_path / "lib"
    ConceptLibrary(root).create("Bobby", kind="object")

    def save_many(writer: int) -> None:
        library = ConceptLibrary(root)
        for index in range(15):
            library.save_embedding("Bobby", f"w{writer}-{index}", torch.full((4,), float(index)))

    pids = [fork(save_many, writer) for writer in range(2)]
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids)
    embeddings = ConceptLibrary(root).get("Bobby").embeddings
    assert len(embeddings) == 30  # a lost read-modify-write would drop entries
    assert all(ConceptLibrary(root).load_embedding("Bobby", m, 4) is not None for m in embeddings)


def test_a_lock_held_too_long_is_a_clear_error(tmp_path, monkeypatch):
    from filelock import FileLock

    root = tmp_path / "lib"
    ConceptLibrary(root).create("Bobby", kind="object")
    ready = tmp_path / "locked"

    def hold_lock() -> None:
        with FileLock(str(root / ".lock")):
            ready.touch()
            time.sleep(30)

    pid = fork(hold_lock)
    try:
        while not ready.exists():
            time.sleep(0.01)
        monkeypatch.setattr(ConceptLibrary, "lock_timeout", 0.2)
        with pytest.raises(MyVLMError, match=f"^{root}: another myvlm process holds the library lock$"):
            ConceptLibrary(root).save_embedding("Bobby", "m", torch.ones(4))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    ConceptLibrary(root).save_embedding("Bobby", "m", torch.ones(4))  # a dead holder's lock is free again


def test_library_on_a_read_only_file_system(capsys):
    read_only = Path("/sys/kernel")  # sysfs refuses new files even to root, unlike chmod
    if not read_only.is_dir():
        pytest.skip("no /sys to stand in for a read-only file system")
    line = cli_error(capsys, "concept", "remove", "Rex", "--library", str(read_only / "myvlm-lib"))
    assert "myvlm-lib: " in line and ("permission denied" in line or "read-only" in line)
    with pytest.raises(MyVLMError, match="/sys/kernel: (permission denied|read-only)"):
        ConceptLibrary(read_only).create("Rex", kind="object")


@pytest.mark.parametrize(
    ("code", "message"),
    [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")],
)
def test_full_disk_or_read_only_library_leaves_the_old_state(lib, monkeypatch, code, message):
    library = concept_with_embedding(lib)
    before = {p: p.read_bytes() for p in Path(lib).rglob("*") if p.is_file()}

    def failing_replace(source, target):
        raise PermissionError(code, os.strerror(code)) if code == errno.EACCES else OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(MyVLMError, match=message):
        library.save_embedding("Bobby", "m", torch.zeros(8))
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in Path(lib).rglob("*") if p.is_file()} == before
    assert torch.equal(library.load_embedding("Bobby", "m"), torch.ones(8))


def test_stale_temporaries_are_ignored_then_cleaned(lib):
    library = concept_with_embedding(lib)
    root = Path(lib)
    (root / ".Max.abc123.tmp").mkdir()
    (root / ".Max.abc123.tmp" / MANIFEST).write_text("{half")
    (root / ".Old.removed-99").mkdir()
    (root / "Bobby" / f".{MANIFEST}.x1.tmp").write_text("{half")
    assert [c.name for c in library.concepts()] == ["Bobby"]
    library.save_embedding("Bobby", "m2", torch.ones(8))
    assert hidden_leftovers(root) == []


def test_library_path_that_is_a_file_and_stray_folder(tmp_path, capsys):
    write(tmp_path / "file", b"")
    assert "library path is a file" in cli_error(capsys, "concept", "list", "--library", str(tmp_path / "file"))
    (tmp_path / "lib" / "Rex").mkdir(parents=True)
    with pytest.raises(MyVLMError, match="exists but is not a concept"):
        ConceptLibrary(tmp_path / "lib").create("Rex", kind="object")


# --- 5. security ----------------------------------------------------------------------------------------------------
class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_never_executed(tmp_path, lib, model_dir, capsys):
    library = concept_with_embedding(lib)
    marker = tmp_path / "pwned"
    (Path(lib) / "Bobby" / EMBEDDINGS).write_bytes(pickle.dumps({"m": Exploit(marker)}))
    with pytest.raises(MyVLMError, match="embeddings.safetensors: damaged"):
        library.load_embedding("Bobby", "m")
    forget_checksums(Path(lib) / "Bobby")  # an earlier version's concept: the file is refused as not safetensors
    with pytest.raises(MyVLMError, match="corrupted tensor file"):
        library.load_embedding("Bobby", "m")
    checkpoint = tmp_path / "concept_embeddings_llava_captioning.pt"
    torch.save({9: {"values": Exploit(marker)}}, checkpoint)
    line = cli_error(
        capsys, "import", str(checkpoint), "--concept", "Bobby", "--model", str(model_dir), "--library", lib
    )
    assert "not a loadable MyVLM checkpoint" in line
    assert not marker.exists()


def test_symbolic_links_never_lead_outside_the_library(tmp_path, lib):
    library = concept_with_embedding(lib)
    outside = tmp_path / "outside" / "Evil"
    outside.mkdir(parents=True)
    (outside / MANIFEST).write_text((Path(lib) / "Bobby" / MANIFEST).read_text().replace("Bobby", "Evil"))
    (Path(lib) / "Evil").symlink_to(outside)
    assert [c.name for c in library.concepts()] == ["Bobby"]
    with pytest.raises(MyVLMError, match="points outside the library"):
        library.get("Evil")
    secret = write(tmp_path / "secret.safetensors", (Path(lib) / "Bobby" / EMBEDDINGS).read_bytes())
    (Path(lib) / "Bobby" / EMBEDDINGS).unlink()
    (Path(lib) / "Bobby" / EMBEDDINGS).symlink_to(secret)
    with pytest.raises(MyVLMError, match="is a symbolic link"):
        library.load_embedding("Bobby", "m")


def test_unexpected_failures_are_one_line_too(monkeypatch, capsys):
    import myvlm.cli

    def broken(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(myvlm.cli, "cmd_concept_list", broken)
    assert main(["concept", "list"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "myvlm: internal error: ZeroDivisionError: division by zero second line (set MYVLM_DEBUG=1 for details)"
    ]


# --- 6. fuzzing the image loader ------------------------------------------------------------------------------------
def seed_files() -> dict[str, bytes]:
    image = photos(1, size=16)[0]
    return {
        "png": image_bytes(image, "PNG"),
        "jpg": exif_rotated_jpeg(),
        "gif": animated("GIF"),
        "webp": animated("WEBP") if features.check("webp") else image_bytes(image, "PNG"),
        "bmp": image_bytes(image, "BMP"),
        "tif": image_bytes(image, "TIFF"),
        "16bit.png": sixteen_bit_png(),
        "palette.png": palette_with_transparency(),
    }


SEEDS = seed_files()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def assert_loads_or_explains(folder: Path, data: bytes, extension: str) -> None:
    path = write(folder / f"input.{extension.rsplit('.', 1)[-1]}", data)
    try:
        image = load_image(path)
    except MyVLMError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)
    else:
        assert image.mode == "RGB" and min(image.size) >= 8


FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


@settings(FUZZ, max_examples=2500)
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, 4095),
)
def test_fuzz_mutated_images_load_or_raise_myvlm_error(fuzz_dir, seed, edits, cut):
    data = bytearray(SEEDS[seed])
    for position, value in edits:
        data[position % len(data)] = value
    assert_loads_or_explains(fuzz_dir, bytes(data[:cut]), seed)


@settings(FUZZ, max_examples=800)
@given(data=st.binary(max_size=512), extension=st.sampled_from(["jpg", "png", "gif", "webp", "tif"]))
def test_fuzz_random_bytes_load_or_raise_myvlm_error(fuzz_dir, data, extension):
    assert_loads_or_explains(fuzz_dir, data, extension)
