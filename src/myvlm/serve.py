"""`myvlm serve`: a local web app (Gradio) over the concept library, for people who will not type `myvlm train`.

Tabs: the concepts of the library, adding one from photos (with the head's calibration), training (one at a time,
with a progress bar and a cancel button) and captioning with the base and the personalized model side by side. It
reuses the library, heads, training and report code; only the page is new. Safe by default: it listens on
127.0.0.1, shares nothing, wants `--auth` elsewhere, limits uploads and shows every bad input as one message on the
page while it keeps serving. Every name and caption put in the page is escaped.

The photos a concept is added from are kept in `<library>/.serve/photos/<name>/` (a hidden folder, which the library
ignores): the Train tab trains on them, and the Concepts tab shows the first as its thumbnail.
"""

from __future__ import annotations

import contextlib
import functools
import html
import ipaddress
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from myvlm.errors import MyVLMError
from myvlm.images import IMAGE_EXTENSIONS, file_box, load_image
from myvlm.library import MANIFEST, ConceptLibrary, check_name
from myvlm.toynames import TOY_MODELS

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
MAX_FILE_SIZE = "25mb"  # per uploaded file: a phone photo is 3-8 MB
MAX_FILES = 64  # per upload
MIN_PHOTOS = 4
CAPTIONS = "captions.json"
DEFAULT_STEPS = 100
CSS = """
.myvlm-frame{position:relative;display:inline-block;line-height:0}
.myvlm-frame img{width:256px;image-rendering:pixelated;border-radius:4px}
.myvlm-box{position:absolute;border:2px solid #e53935;box-sizing:border-box}
.myvlm-box span{position:absolute;left:-2px;top:-20px;background:#e53935;color:#fff;font:12px/18px system-ui;
  padding:0 4px;white-space:nowrap;border-radius:2px}
.myvlm-photo{display:flex;gap:16px;align-items:flex-start;margin:12px 0;padding-top:24px}
.myvlm-table td,.myvlm-table th{padding:4px 10px;text-align:left;vertical-align:top}
.myvlm-thumb{width:64px;height:64px;object-fit:cover;image-rendering:pixelated;border-radius:4px}
.myvlm-ok{color:#2e7d32}.myvlm-low{color:#c62828}
"""


class TrainingCancelled(KeyboardInterrupt):
    """The Cancel button, raised inside a training step: stored like Ctrl-C, the best vector so far kept."""


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, _, password = text.partition(":")
    if not user or not password:
        raise MyVLMError("--auth takes USER:PASS, both non-empty")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, auth, share: bool) -> None:
    """Anyone who can reach the app can read and change the library: outside this machine, only with a password."""
    if auth is None and not is_loopback(host):
        raise MyVLMError(f"--host {host} makes the app reachable from other machines; give --auth USER:PASS too")
    if auth is None and share:
        raise MyVLMError("--share puts the app on a public URL; give --auth USER:PASS too")


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def uploaded_paths(files) -> list[Path]:
    """Gradio gives a path or a list of paths (or file objects with `.name`)."""
    if files is None:
        return []
    files = files if isinstance(files, list | tuple) else [files]
    return [Path(getattr(f, "name", f)) for f in files]


def read_uploads(files, what: str, *, at_least: int = 1) -> tuple[list[Image.Image], list[str]]:
    """Images and their file names; a bad file is one message naming it (as the user named it, not the server's
    temporary path) and what is wrong."""
    images, names, _ = read_upload_files(files, what, at_least=at_least)
    return images, names


def read_upload_files(files, what: str, *, at_least: int = 1) -> tuple[list[Image.Image], list[str], list[Path]]:
    """`read_uploads`, with the uploaded files' paths."""
    paths = uploaded_paths(files)
    if len(paths) < at_least:
        raise MyVLMError(f"{what}: give at least {at_least} photo{'s' * (at_least > 1)} (got {len(paths)})")
    if len(paths) > MAX_FILES:
        raise MyVLMError(f"{what}: at most {MAX_FILES} photos at once (got {len(paths)})")
    images, names = [], []
    for path in paths:
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise MyVLMError(f"{path.name}: not an image file (accepted: {' '.join(IMAGE_EXTENSIONS)})")
        try:
            images.append(load_image(path))
        except MyVLMError as error:
            raise MyVLMError(str(error).replace(str(path), path.name, 1)) from None
        names.append(path.name)
    return images, names, paths


class PhotoStore:
    """The photos each concept was added from, so that it can be trained and shown later."""

    def __init__(self, library_root: Path) -> None:
        self.root = library_root / ".serve" / "photos"

    def folder(self, name: str) -> Path:
        return self.root / check_name(name)

    def save(self, name: str, files: Sequence[Path], captions: dict[str, list[str]] | None) -> None:
        """The uploaded files as they are (checked images), under their own names, which captions.json uses."""
        from myvlm.storage import write_bytes_atomic, write_json_atomic

        folder = self.folder(name)
        for path in files:
            write_bytes_atomic(folder / path.name, path.read_bytes())
        if captions is not None:
            write_json_atomic(folder / CAPTIONS, captions)

    def paths(self, name: str) -> list[Path]:
        folder = self.folder(name)
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []

    def captions(self, name: str) -> Path | None:
        path = self.folder(name) / CAPTIONS
        return path if path.is_file() else None

    def remove(self, name: str) -> None:
        import shutil

        shutil.rmtree(self.folder(name), ignore_errors=True)


class App:
    """The state behind the page: the library, the captioning model (loaded in the background so the page is up at
    once), and the training model, a second copy so that captioning goes on while a concept trains."""

    def __init__(self, model: str, library: str | None) -> None:
        self.model = model
        # A damaged concept is shown on the Concepts tab (from `library.damaged`), not warned about on stderr.
        self.library = ConceptLibrary(library, on_damage=lambda name, error: None)
        self.photos = PhotoStore(self.library.root)
        self.encoder_name = f"vision-tower:{model}" if model in TOY_MODELS else None  # toys: the toy world's CLIP
        self._vlm = None
        self._vlm_error: str | None = None
        self._vlm_ready = threading.Event()
        self._vlm_lock = threading.Lock()  # captioning, asking and building heads use the captioning model in turn
        self._library_state = None
        self._trainer = None
        self._cancel = threading.Event()
        self._training = threading.Lock()

    # --- models ---------------------------------------------------------------------------------------------------
    def load_in_background(self) -> None:
        threading.Thread(target=self._load, name="myvlm-model", daemon=True).start()

    def _load(self) -> None:
        from myvlm.model import load

        try:
            self._vlm = load(self.model)
        except Exception as error:  # noqa: BLE001 - said on the page and on stderr, the app keeps serving
            self._vlm_error = f"cannot load {self.model}: {' '.join(str(error).splitlines())}"
            print(f"myvlm: error: {self._vlm_error}", file=sys.stderr)
        finally:
            self._vlm_ready.set()

    @contextlib.contextmanager
    def captioner(self):
        """The captioning model with the library's current concepts, for one request at a time."""
        self._vlm_ready.wait()
        if self._vlm is None:
            raise MyVLMError(self._vlm_error or f"cannot load {self.model}")
        with self._vlm_lock:
            state = self._library_fingerprint()
            if state != self._library_state:  # a concept was added, trained or removed: reload them all
                for name in list(self._vlm.concepts):
                    self._vlm.remove_concept(name)
                self._vlm.use_library(self.library)
                self._library_state = state
            yield self._vlm

    def _library_fingerprint(self) -> tuple:
        manifests = sorted(self.library.root.glob(f"*/{MANIFEST}")) if self.library.root.is_dir() else []
        return tuple((path.parent.name, path.stat().st_mtime_ns) for path in manifests)

    # --- concepts -------------------------------------------------------------------------------------------------
    def concept_names(self) -> list[str]:
        return [concept.name for concept in self.library.concepts()]

    def concepts_html(self) -> str:
        from myvlm.report import thumbnail_data_uri

        concepts = self.library.concepts()
        if not concepts and not self.library.damaged:
            return f"<p>No concepts in {escape(self.library.root)} yet: add one in <b>Add a concept</b>.</p>"
        rows = []
        for concept in concepts:
            photos = self.photos.paths(concept.name)
            thumb = ""
            if photos:
                thumb = f"<img class='myvlm-thumb' src='{thumbnail_data_uri(load_image(photos[0]), 128)}' alt=''>"
            models = []
            for model_id in sorted(concept.embeddings):
                entry = concept.embedding(model_id)
                state = "" if entry.complete else f" (interrupted at step {entry.steps})"
                models.append(escape(model_id + state))
            head = "" if concept.head else "<br><span class='myvlm-low'>no head: never detected</span>"
            rows.append(
                f"<tr><td>{thumb}</td><td><b>{escape(concept.name)}</b>{head}</td>"
                f"<td>{escape(concept.kind)}</td><td>{escape(concept.identifier)}</td>"
                f"<td>{escape(concept.class_word or '-')}</td><td>{'<br>'.join(models) or 'not trained yet'}</td></tr>"
            )
        for name, error in self.library.damaged.items():
            rows.append(
                f"<tr><td></td><td><b>{escape(name)}</b></td><td colspan='4' class='myvlm-low'>damaged: "
                f"{escape(error)}</td></tr>"
            )
        header = (
            "<tr><th></th><th>name</th><th>kind</th><th>identifier</th><th>class word</th><th>trained for</th></tr>"
        )
        return f"<table class='myvlm-table'>{header}{''.join(rows)}</table>"

    def remove(self, name: str | None) -> str:
        if not name:
            raise MyVLMError("pick a concept to remove")
        self.library.remove(name)
        self.photos.remove(name)
        self.library.damaged.pop(name, None)
        return f"removed concept '{name}'"

    def add(self, files, kind, name, identifier, class_word, negative_files, captions_file=None) -> str:
        """Build the head from the photos, store the concept, keep its photos; the head's calibration as HTML."""
        from myvlm.heads import ObjectHead
        from myvlm.heads.objects import calibrate_together
        from myvlm.library import build_head

        name = check_name(name or "")
        if name in self.library:
            raise MyVLMError(f"a concept named '{name}' already exists; remove it first or pick a new name")
        identifier = self.library.check_identifier(identifier or name)
        if not (class_word or "").strip():
            raise MyVLMError("give the class word (what it is: dog, mug, man): training names it in the captions")
        class_word = check_name(class_word, "class word")
        if kind not in ("object", "person"):
            raise MyVLMError(f"kind must be object or person, not {kind!r}")
        if kind == "person" and negative_files:
            raise MyVLMError("photos without the concept are for objects; a person is told apart by the faces")
        images, sources, paths = read_upload_files(files, "photos of the concept", at_least=MIN_PHOTOS)
        if len(set(sources)) != len(sources):
            twice = next(n for n in sources if sources.count(n) > 1)
            raise MyVLMError(f"two photos are named {twice}; rename one")
        captions = read_captions_upload(captions_file, sources)
        negatives = read_uploads(negative_files, "photos without it")[0] if negative_files else None
        if self.encoder_name and kind == "object":  # a toy model's vision tower is the head's encoder
            from myvlm.model import resolve_encoder

            with self.captioner() as vlm:
                head = build_head(kind, images, negatives, encoder=resolve_encoder(self.encoder_name, vlm))
        else:
            head = build_head(kind, images, negatives, sources=sources)
        kin, recalibrated = {}, []
        if kind == "object":  # concepts sharing the class word are each other's negatives, as `concept add` does
            kin = {
                c.name: self.library.load_head(c.name)
                for c in self.library.concepts()
                if c.kind == "object" and c.class_word == class_word and c.head
            }
            recalibrated = calibrate_together(name, head, {n: h for n, h in kin.items() if isinstance(h, ObjectHead)})
        self.photos.remove(name)  # photos left by a concept of that name removed outside the app
        self.photos.save(name, paths, captions)
        try:
            self.library.create(name, kind=kind, identifier=identifier, class_word=class_word, head=head)
        except MyVLMError:
            self.photos.remove(name)
            raise
        for other in recalibrated:
            self.library.save_head(other, kin[other])
        return calibration_html(name, identifier, head, sources, recalibrated)

    # --- training -------------------------------------------------------------------------------------------------
    def train(
        self, names: Sequence[str], model: str, steps: int, report: Callable[[str, int, int, float], None]
    ) -> str:
        """Train each picked concept alone on the photos it was added from; `report(name, done, total, loss)`."""
        from myvlm.personalize import MissingClassWord, TrainingInterrupted, train_concept

        names = list(names or [])
        if not names:
            raise MyVLMError("pick at least one concept to train")
        model = (model or self.model).strip()
        steps = int(steps or DEFAULT_STEPS)
        if not 1 <= steps <= 10_000:
            raise MyVLMError(f"steps must be between 1 and 10000, not {steps}")
        photos = {}
        for name in names:
            photos[name] = [str(p) for p in self.photos.paths(name)]
            if not photos[name]:
                raise MyVLMError(
                    f"the app keeps no photos of '{name}' (added with the command line?); train it with "
                    f"`myvlm train {name} --model {model} --images PHOTOS`"
                )
        with self._training:
            self._cancel.clear()
            trainer = self._training_model(model)
            lines = []
            for name in names:

                def on_progress(done: int, total: int, loss: float, name=name) -> None:
                    if self._cancel.is_set():
                        raise TrainingCancelled
                    report(name, done, total, loss)

                try:
                    done = train_concept(
                        self.library,
                        name,
                        model,
                        images=photos[name],
                        captions=str(self.photos.captions(name) or "") or None,
                        steps=steps,
                        vlm=trainer,
                        on_progress=on_progress,
                    )
                except TrainingInterrupted as stopped:
                    lines.append(f"cancelled: {stopped}; train it again to finish")
                    break
                except TrainingCancelled:
                    lines.append(f"cancelled '{name}' before its first step; nothing stored")
                    break
                except MissingClassWord:
                    raise MyVLMError(f"concept '{name}' has no class word; set it with `myvlm concept edit`") from None
                note = f" ({done.stopped_early})" if done.stopped_early else ""
                lines.append(
                    f"trained '{done.name}' for {done.model_id}: {done.steps} steps, loss {done.final_loss:.3f}{note}"
                )
            return "\n\n".join(lines)

    def _training_model(self, model: str):
        from myvlm.hub import check_model_name
        from myvlm.model import load

        if self._trainer is None or self._trainer.model_id != model:
            check_model_name(model)
            self._trainer = None  # the previous one's memory first
            self._trainer = load(model)
        return self._trainer

    def cancel(self) -> str:
        if not self._training.locked():
            return "no training is running"
        self._cancel.set()
        return "cancelling after the current step..."

    # --- captioning -----------------------------------------------------------------------------------------------
    def caption(self, files) -> tuple[str, list, str, str]:
        """(results HTML, photos for the question box, JSON file, HTML report file)."""
        from myvlm.report import write_report

        images, names = read_uploads(files, "photos to caption")
        with self.captioner() as vlm:
            found = vlm.detector.detect(images) if vlm.detector else [[] for _ in images]
            fired = [[d.concept for d in detections] for detections in found]
            base = vlm.caption(images, [[] for _ in images])
            personal = vlm.caption(images, fired)
        results = [
            {
                "image": name,
                "detections": [
                    {"concept": d.concept, "score": round(float(d.score), 4), "box": file_box(d.box, image)}
                    for d in detections
                ],
                "base_caption": b.text,
                "caption": p.text,
            }
            for name, image, detections, b, p in zip(names, images, found, base, personal, strict=True)
        ]
        out = Path(tempfile.mkdtemp(prefix="myvlm-serve-"))
        (out / "captions.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
        rows = [
            (image, r["image"], [", ".join(fired_here) or "-", r["base_caption"], r["caption"]], bool(fired_here))
            for image, r, fired_here in zip(images, results, fired, strict=True)
        ]
        write_report(
            out / "captions.html",
            f"myvlm captions — {self.model}",
            ["concepts", "base caption", "personalized caption"],
            rows,
            {"model": self.model, "images": len(rows)},
        )
        cards = "".join(
            photo_html(image, r, found_here) for image, r, found_here in zip(images, results, found, strict=True)
        )
        return cards, list(zip(names, images, strict=True)), str(out / "captions.json"), str(out / "captions.html")

    def ask(self, photos: list, which: str | None, question: str) -> str:
        if not photos:
            raise MyVLMError("caption photos first, then ask about one of them")
        if not (question or "").strip():
            raise MyVLMError("the question is empty")
        image = dict(photos).get(which) if which else photos[0][1]
        if image is None:
            raise MyVLMError(f"no photo named '{which}' in the last captioned set")
        with self.captioner() as vlm:
            base = vlm.ask(image, question, concepts=[])
            personal = vlm.ask(image, question)
        named = f" ({', '.join(personal.concepts)})" if personal.concepts else ""
        return f"**personalized{escape(named)}:** {escape(personal.text)}\n\n**base:** {escape(base.text)}"


def read_captions_upload(upload, photos: Sequence[str]) -> dict[str, list[str]] | None:
    """An optional captions.json (photo file name -> captions, as `myvlm train --captions` takes) for these photos."""
    from myvlm.personalize import read_captions

    paths = uploaded_paths(upload)
    if not paths:
        return None
    captions = read_captions(paths[0])
    missing = [name for name in photos if name not in captions]
    if missing:
        raise MyVLMError(f"{paths[0].name}: no captions for {missing[0]} (it maps photo file names to captions)")
    return {name: captions[name] for name in photos}


def calibration_html(name, identifier, head, sources, recalibrated) -> str:
    """The head's threshold and each photo's leave-one-out score (in detection scores), with whether it passes."""
    threshold = head.threshold if head.kind == "object" else 1.0 - head.threshold
    scores = head.held_out_scores()
    rows = "".join(
        f"<tr><td>{escape(source)}</td><td class='{'myvlm-ok' if s >= threshold else 'myvlm-low'}'>{s:.3f}</td></tr>"
        for source, s in zip(sources, scores, strict=False)
    )
    what = "probability" if head.kind == "object" else "1 - face distance"
    notes = "".join(
        f"<li>{escape(note)}</li>"
        for note in [*head.notes, *(f"re-calibrated '{other}' against it (same class word)" for other in recalibrated)]
    )
    return (
        f"<p>Added <b>{escape(name)}</b> (identifier <b>{escape(identifier)}</b>). Head calibration: it fires at "
        f"a score ({what}) of <b>{threshold:.3f}</b> or more. Each photo scored by a head built without it "
        f"(leave-one-out): how a new photo of it would fare.</p>"
        f"<table class='myvlm-table'><tr><th>photo</th><th>leave-one-out score</th></tr>{rows}</table>"
        + (f"<ul>{notes}</ul>" if notes else "")
    )


def photo_html(image: Image.Image, result: dict, detections) -> str:
    """One captioned photo: its detections as labelled boxes over it, base and personalized caption side by side."""
    from myvlm.report import thumbnail_data_uri

    boxes = []
    for detection in detections:
        box = detection.box or (0, 0, image.width, image.height)
        left, top = 100 * box[0] / image.width, 100 * box[1] / image.height
        width, height = 100 * (box[2] - box[0]) / image.width, 100 * (box[3] - box[1]) / image.height
        boxes.append(
            f"<div class='myvlm-box' style='left:{left:.2f}%;top:{top:.2f}%;width:{width:.2f}%;height:{height:.2f}%'>"
            f"<span>{escape(detection.concept)} {detection.score:.2f}</span></div>"
        )
    found = ", ".join(f"{escape(d['concept'])} ({d['score']:.2f})" for d in result["detections"]) or "no concept found"
    return (
        f"<div class='myvlm-photo'><div class='myvlm-frame'><img src='{thumbnail_data_uri(image)}' alt=''>"
        f"{''.join(boxes)}</div><table class='myvlm-table'><tr><th colspan='2'>{escape(result['image'])}: {found}</th>"
        f"</tr><tr><th>base</th><th>personalized</th></tr><tr><td class='myvlm-base'>{escape(result['base_caption'])}"
        f"</td><td class='myvlm-personal'>{escape(result['caption'])}</td></tr></table></div>"
    )


def shown(function):
    """A handler whose errors become one message on the page (gr.Error), never a stopped app."""
    import gradio as gr

    @functools.wraps(function)
    def handler(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except MyVLMError as error:
            raise gr.Error(" ".join(str(error).splitlines()), duration=30, print_exception=False) from None
        except gr.Error:
            raise
        except Exception as error:  # noqa: BLE001 - a bug still leaves the app serving, with a trace on stderr
            traceback.print_exc()
            message = f"internal error: {type(error).__name__}: {error}"
            raise gr.Error(message, duration=30, print_exception=False) from None

    return handler


def build_app(app: App):
    import gradio as gr

    models = list(dict.fromkeys([app.model, *TOY_MODELS]))
    with gr.Blocks(title="myvlm", analytics_enabled=False) as page:
        gr.Markdown(
            f"# myvlm\nYour concepts, named in captions. Model: **{escape(app.model)}**, "
            f"library: `{escape(app.library.root)}`"
        )
        with gr.Tab("Concepts"):
            concepts = gr.HTML(elem_id="concepts")
            with gr.Row():
                to_remove = gr.Dropdown(label="concept", choices=[], elem_id="remove-name")
                remove_button = gr.Button("Remove", variant="stop", elem_id="remove")
            removed = gr.Markdown()
        with gr.Tab("Add a concept"):
            with gr.Row():
                photos = gr.File(
                    label=f"photos of it ({MIN_PHOTOS} or more; for a person, photos of their face)",
                    file_count="multiple",
                    file_types=["image"],
                    elem_id="photos",
                )
                negatives = gr.File(
                    label="photos without it (optional, objects)",
                    file_count="multiple",
                    file_types=["image"],
                    elem_id="negatives",
                )
            with gr.Row():
                kind = gr.Radio(["object", "person"], value="object", label="kind", elem_id="kind")
                name = gr.Textbox(label="name", elem_id="name")
                identifier = gr.Textbox(
                    label="identifier (the word captions use; default: the name)", elem_id="identifier"
                )
                class_word = gr.Textbox(label="class word (dog, mug, man)", elem_id="class-word")
            captions = gr.File(
                label="captions.json (optional: photo file name -> captions naming it; else the model's own captions)",
                file_types=[".json"],
                elem_id="captions-file",
            )
            add_button = gr.Button("Add concept", variant="primary", elem_id="add")
            calibration = gr.HTML(elem_id="calibration")
        with gr.Tab("Train"):
            with gr.Row():
                to_train = gr.CheckboxGroup(label="concepts", choices=[], elem_id="train-names")
                model = gr.Dropdown(models, value=app.model, label="model", allow_custom_value=True, elem_id="model")
                steps = gr.Number(DEFAULT_STEPS, label="steps", precision=0, minimum=1, maximum=10_000, elem_id="steps")
            with gr.Row():
                train_button = gr.Button("Train", variant="primary", elem_id="train")
                cancel_button = gr.Button("Cancel", elem_id="cancel")
            trained = gr.Markdown(elem_id="trained")
            cancelled = gr.Markdown()
        with gr.Tab("Caption & ask"):
            to_caption = gr.File(label="photos", file_count="multiple", file_types=["image"], elem_id="caption-photos")
            caption_button = gr.Button("Caption", variant="primary", elem_id="caption")
            captioned = gr.HTML(elem_id="captions")
            with gr.Row():
                json_file = gr.File(label="results (JSON)", interactive=False, elem_id="json")
                report_file = gr.File(label="report (HTML)", interactive=False, elem_id="report")
            shown_photos = gr.State([])
            with gr.Row():
                which = gr.Dropdown(label="photo", choices=[], elem_id="ask-photo")
                question = gr.Textbox(label="question", placeholder="What is Bobby doing?", elem_id="question")
                ask_button = gr.Button("Ask", elem_id="ask")
            answer = gr.Markdown(elem_id="answer")

        def refresh():
            names = app.concept_names()
            return app.concepts_html(), gr.Dropdown(choices=names, value=None), gr.CheckboxGroup(choices=names)

        listing = [concepts, to_remove, to_train]
        page.load(shown(refresh), outputs=listing)
        remove_button.click(shown(app.remove), to_remove, removed).then(shown(refresh), outputs=listing)
        add_button.click(
            shown(app.add),
            [photos, kind, name, identifier, class_word, negatives, captions],
            calibration,
            concurrency_id="model",
        ).success(shown(refresh), outputs=listing)

        def train(names, model_name, step_count, progress=gr.Progress()):
            def report(concept, done, total, loss):
                progress((done, total), desc=f"{concept}: step {done}/{total}, loss {loss:.3f}", unit="steps")

            return app.train(names, model_name, step_count, report)

        train_button.click(
            shown(train), [to_train, model, steps], trained, concurrency_limit=1, concurrency_id="train"
        ).then(shown(refresh), outputs=listing)
        cancel_button.click(app.cancel, outputs=cancelled, queue=False)

        def caption(files):
            cards, kept, json_path, report_path = app.caption(files)
            names = [n for n, _ in kept]
            return cards, kept, json_path, report_path, gr.Dropdown(choices=names, value=names[0])

        caption_button.click(
            shown(caption),
            to_caption,
            [captioned, shown_photos, json_file, report_file, which],
            concurrency_id="model",
        )
        ask_button.click(shown(app.ask), [shown_photos, which, question], answer, concurrency_id="model")
    return page


def serve(
    model: str = "toy-llava",
    library: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    auth: str | None = None,
    share: bool = False,
) -> None:
    """Check the options, put the page up, then load the model in the background (the page says when it is ready)."""
    from myvlm.hub import check_model_name

    credentials = parse_auth(auth)
    check_exposure(host, credentials, share)
    check_model_name(model)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise MyVLMError("the web app needs gradio: pip install 'myvlm[serve]'") from None
    app = App(model, library)
    started = time.perf_counter()
    page = build_app(app)
    page.queue(default_concurrency_limit=1, max_size=64)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    try:
        page.launch(
            server_name=host,
            server_port=port,
            auth=credentials,
            share=share,
            max_file_size=MAX_FILE_SIZE,
            ssr_mode=False,
            theme=theme,
            css=CSS,
            footer_links=[],
            quiet=True,
            show_error=True,
            prevent_thread_lock=True,
        )
    except OSError as error:
        raise MyVLMError(f"cannot listen on {host}:{port}: {' '.join(str(error).splitlines())}") from None
    print(
        f"myvlm: serving {model} on http://{host}:{port} (page up in {time.perf_counter() - started:.1f} s; "
        "Ctrl-C stops it)",
        file=sys.stderr,
        flush=True,
    )
    app.load_in_background()  # after the page is up: importing torch and transformers would hold it back
    try:
        page.block_thread()
    except KeyboardInterrupt:
        page.close()
