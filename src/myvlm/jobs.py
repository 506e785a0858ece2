"""Captioning or detecting over a whole photo library: a lazy recursive walk, photos read a batch ahead, every concept
head and the captioner run a batch at a time, and one result row per photo appended (and flushed) as each batch ends,
so that memory stays flat whatever the library's size and a re-run resumes where a crash (even `kill -9`) stopped.

Rows: `{"image", "concepts", "detections": [{"concept", "score", "box"}], "caption"}` (detect: no caption) or
`{"image", "error"}` for a file that cannot be read. The Ray engine (myvlm.ray_engine) writes the same rows."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from myvlm.errors import MyVLMError, UnusableImage
from myvlm.images import IMAGE_EXTENSIONS, file_box, load_image
from myvlm.storage import explain_os_errors

CAPTION, DETECT = "caption", "detect"
PARQUET = ".parquet"


# --- finding the photos ---------------------------------------------------------------------------------------------
def walk_images(roots: Iterable[str | os.PathLike], warn: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Image files under the given files and folders, lazily, in a stable order (sorted by name, depth first).

    Folders are walked recursively; no symlinked folder is entered and no symlinked file pointing out of the given
    roots is taken, so a link cannot pull a job outside of them. Hidden names (".thumbnails", "._IMG_1.jpg") are
    skipped. Named files are kept even when missing or unreadable, so that each is reported by name."""
    for raw in roots:
        root = Path(raw)
        if not root.is_dir():
            yield root
            continue
        try:
            entries = _listing(root)
        except OSError as error:
            raise MyVLMError(f"{root}: cannot list folder ({error.strerror or error})") from None
        yield from _walk(root, entries, os.path.realpath(root), warn)


def _listing(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as scan:
        return sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)


def _walk(folder: Path, entries: list[os.DirEntry], real_root: str, warn) -> Iterator[Path]:
    for entry in entries:
        path = folder / entry.name
        try:
            if entry.is_symlink():
                target = os.path.realpath(path)
                inside = os.path.commonpath([target, real_root]) == real_root
                if inside and os.path.isfile(target) and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    yield path
            elif entry.is_dir(follow_symlinks=False):
                try:
                    children = _listing(path)
                except OSError as error:
                    if warn:
                        warn(f"myvlm: warning: skipping folder {path}: {error.strerror or error}")
                    continue
                yield from _walk(path, children, real_root, warn)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file(follow_symlinks=False):
                yield path
        except OSError:  # vanished or unreadable while walking: a named file would say so; here it is not ours
            continue


def row_key(image: str) -> int:
    """What identifies a photo across runs: its absolute path (so "photos/x.jpg" and "./photos/x.jpg" are one)."""
    return int.from_bytes(hashlib.blake2b(os.path.abspath(image).encode(), digest_size=8).digest(), "little")


# --- the result rows ------------------------------------------------------------------------------------------------
def detection_labels(detector, images: Sequence[Image.Image]) -> list[dict]:
    """Per photo: the concepts found (sorted) and each detection with its score and box; every head, one pass."""
    if detector is None:
        return [{"concepts": [], "detections": []} for _ in images]
    labels = []
    for image, found in zip(images, detector.detect(images), strict=True):
        detections = [
            {"concept": d.concept, "score": round(float(d.score), 4), "box": file_box(d.box, image)} for d in found
        ]
        labels.append({"concepts": sorted(d["concept"] for d in detections), "detections": detections})
    return labels


def caption_labels(vlm, images: Sequence[Image.Image], labels: list[dict], batch_size: int) -> list[dict]:
    """The detection labels with each photo's caption, naming the concepts detected in it (greedy decoding)."""
    captions = vlm.caption(images, [label["concepts"] for label in labels], batch_size=batch_size)
    return [label | {"caption": caption.text} for label, caption in zip(labels, captions, strict=True)]


class Labeler:
    """Labels a batch of photos: a VLM's captions with its concepts' detections, or the library's detections alone."""

    def __init__(self, detector, vlm=None, batch_size: int = 8) -> None:
        self.detector, self.vlm, self.batch_size = detector, vlm, batch_size

    def __call__(self, images: Sequence[Image.Image]) -> list[dict]:
        labels = detection_labels(self.detector, images)
        return labels if self.vlm is None else caption_labels(self.vlm, images, labels, self.batch_size)


def build_detector(library, model_id: str | None = None, vlm=None):
    """Every library concept's head (for a caption job, of the concepts trained for `model_id` only, as
    PersonalizedVLM.use_library does) in one ConceptDetector; None without heads. Vision-tower encoders come from
    `vlm` where it is that model."""
    from myvlm.heads import ConceptDetector
    from myvlm.model import resolve_encoder
    from myvlm.vision_encoder import tower_encoder_names

    heads = {
        c.name: library.load_head(c.name)
        for c in library.concepts()
        if c.head is not None and (model_id is None or model_id in c.embeddings)
    }
    heads = {name: head for name, head in heads.items() if head is not None}
    if not heads:
        return None
    return ConceptDetector(heads, {n: resolve_encoder(n, vlm) for n in tower_encoder_names(heads.values())})


# --- where rows go --------------------------------------------------------------------------------------------------
class JsonlResults:
    """A JSON-lines result file that a job appends to and a re-run resumes from.

    Opening it repairs a torn last line (a row cut by a crash: dropped, so its photo is done again, never twice)
    and remembers which photos have a row: 8 bytes each, a sorted array, so 2 million done photos cost 16 MB."""

    def __init__(self, path: str | os.PathLike, kind: str) -> None:
        self.path = Path(path)
        self.kind = kind
        keys = []
        with explain_os_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a+b")  # noqa: SIM115 - held open for the job, closed by close()
            self.handle.seek(0)
            good_end = 0
            for number, line in enumerate(self.handle, 1):
                if not line.endswith(b"\n"):
                    break  # torn: cut off below
                keys.append(row_key(self._check(line, number)))
                good_end += len(line)
            self.repaired = good_end != self.handle.seek(0, os.SEEK_END)
            if self.repaired:
                self.handle.truncate(good_end)
        self.done = np.sort(np.array(keys, dtype=np.uint64))

    def _check(self, line: bytes, number: int) -> str:
        try:
            row = json.loads(line)
            image = row["image"]
        except (ValueError, TypeError, KeyError):
            raise MyVLMError(
                f"{self.path}: line {number} is not a myvlm result row; give --out a new file or this job's own"
            ) from None
        if "error" not in row and (self.kind == CAPTION) != ("caption" in row):
            other = DETECT if self.kind == CAPTION else CAPTION
            raise MyVLMError(f"{self.path} holds `myvlm {other}` rows; give this {self.kind} job another --out")
        return image

    def __contains__(self, image: str) -> bool:
        if not len(self.done):
            return False
        key = np.uint64(row_key(image))
        index = int(np.searchsorted(self.done, key))
        return index < len(self.done) and self.done[index] == key

    @property
    def count(self) -> int:
        return len(self.done)

    def write(self, rows: Sequence[dict]) -> None:
        """Append the rows in one write and flush: a kill leaves whole rows, at worst one torn last line."""
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        with explain_os_errors(self.path):
            self.handle.write(data)
            self.handle.flush()

    def close(self, complete: bool = True) -> None:
        self.handle.close()


class ParquetResults:
    """A Parquet result file, written a row group per batch to a hidden partial file renamed into place at the end:
    Parquet cannot be appended to, so a crashed job starts over (use .jsonl to resume)."""

    def __init__(self, path: str | os.PathLike, kind: str) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise MyVLMError("writing .parquet needs pyarrow: pip install 'myvlm[ray]' (or use .jsonl)") from None
        self.path, self.kind, self.count = Path(path), kind, 0
        if self.path.exists():
            raise MyVLMError(f"{self.path} exists and Parquet cannot be resumed; remove it or write .jsonl")
        detection = pa.struct([("concept", pa.string()), ("score", pa.float64()), ("box", pa.list_(pa.float64()))])
        fields = [("image", pa.string()), ("concepts", pa.list_(pa.string())), ("detections", pa.list_(detection))]
        fields += [("caption", pa.string())] if kind == CAPTION else []
        self.schema = pa.schema([*fields, ("error", pa.string())])
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        with explain_os_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.partial, self.schema)
        self.to_table = pa.Table.from_pylist

    def __contains__(self, image: str) -> bool:
        return False

    def write(self, rows: Sequence[dict]) -> None:
        with explain_os_errors(self.path):
            self.writer.write_table(self.to_table(list(rows), schema=self.schema))

    def close(self, complete: bool = True) -> None:
        self.writer.close()
        if complete:
            os.replace(self.partial, self.path)


def open_results(path: str | os.PathLike, kind: str) -> JsonlResults | ParquetResults:
    return ParquetResults(path, kind) if str(path).lower().endswith(PARQUET) else JsonlResults(path, kind)


# --- the local engine -----------------------------------------------------------------------------------------------
@dataclass
class JobSummary:
    labeled: int = 0  # rows with labels written by this run
    failed: int = 0  # error rows written by this run
    skipped: int = 0  # photos with a row from an earlier run
    first_error: str | None = None


def read_photo(path: Path) -> tuple[Image.Image | None, str | None]:
    """(image, None), or (None, the one-line reason it cannot be read)."""
    try:
        return load_image(path), None
    except MyVLMError as error:
        return None, " ".join(str(error).splitlines())


def read_batch(paths: Sequence[Path]) -> list[tuple[Path, Image.Image | None, str | None]]:
    return [(path, *read_photo(path)) for path in paths]


def run_job(
    roots: Sequence[str],
    labeler: Callable[[], Callable[[Sequence[Image.Image]], list[dict]]],
    results,
    *,
    batch_size: int,
    quiet: bool = False,
    on_rows: Callable[[list[dict], list[Image.Image | None]], None] | None = None,
    note: Callable[[str], None] = lambda line: None,
) -> JobSummary:
    """Label every photo under `roots` that `results` does not hold yet, a batch at a time, appending its rows.

    `labeler` makes the batch labeler on the first readable photo (a job of unreadable or done photos loads no
    model); the next batch is read while this one is labeled; `on_rows` sees each batch's rows and images; `note`
    gets the line for each unreadable photo or folder (the CLI prints them above the progress bar)."""
    from tqdm.auto import tqdm

    summary = JobSummary()
    total = 0
    for path in walk_images(roots):
        if str(path) in results:
            summary.skipped += 1
        else:
            total += 1
    if not total and not summary.skipped:
        raise MyVLMError(f"no images found in {', '.join(str(r) for r in roots)}")
    bar = tqdm(total=total, disable=True if quiet or not total else None, unit="photo", desc="photos", file=sys.stderr)

    def say(line: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):
            note(line)

    pending = (p for p in walk_images(roots, warn=say) if str(p) not in results)
    batches = iter(lambda: list(islice(pending, batch_size)), [])
    label = None
    complete = False
    try:
        with ThreadPoolExecutor(max_workers=1) as reader:
            upcoming = reader.submit(read_batch, next(batches, []))
            while batch := upcoming.result():
                upcoming = reader.submit(read_batch, next(batches, []))  # read ahead while this batch runs
                good = [image for _, image, _ in batch if image is not None]
                if good and label is None:
                    label = labeler()
                labels = iter(labeled(label, good))
                rows = []
                for path, _, error in batch:
                    if error is None and isinstance(label_row := next(labels), str):
                        error = f"{path}: {label_row}"
                    if error is None:
                        rows.append({"image": str(path), **label_row})
                        summary.labeled += 1
                    else:
                        rows.append({"image": str(path), "error": error})
                        summary.failed += 1
                        summary.first_error = summary.first_error or error
                        say(f"myvlm: skipping {error}")
                results.write(rows)
                if on_rows is not None:
                    on_rows(rows, [image for _, image, _ in batch])
                bar.update(len(batch))
        complete = True
    finally:
        bar.close()
        results.close(complete)
    return summary


def labeled(label: Callable[[list], list[dict]], photos: list) -> list[dict | str]:
    """The batch's labels (`photos`: its images, or whatever `label` takes per photo); where the model refuses one
    of them, each photo alone, a refused one as the one-line reason (its row says so and the job goes on, as for a
    file that cannot be read)."""
    try:
        return label(photos) if photos else []
    except UnusableImage as error:
        if len(photos) == 1:
            return [" ".join(str(error).splitlines())]
        return [row for photo in photos for row in labeled(label, [photo])]


class NoFile:
    """Where rows go without --out: nowhere but `run_job`'s `on_rows` (printed, --json, --report)."""

    count = 0

    def __contains__(self, image: str) -> bool:
        return False

    def write(self, rows: Sequence[dict]) -> None:
        """Nothing to write: the rows are printed as they come."""

    def close(self, complete: bool = True) -> None:
        """Nothing to close."""
