"""The concept library: one folder per concept, a JSON manifest plus safetensors files.

    <library>/<name>/concept.json          name, identifier, kind, class word, created, head config, embeddings index,
                                           and the sha256 and size of each tensor file ("files")
    <library>/<name>/embeddings.safetensors one vector per model id (key = model id)
    <library>/<name>/head.safetensors       the concept head's parameters

Writes are atomic and serialized by a lock file, so a crash or a second process never leaves a half-written concept.
A new concept is built in a hidden temporary folder and renamed into place. A tensor file is checked against the
manifest's checksum whenever it is read, so a changed byte is found as damage, never loaded. One damaged concept
costs only itself: `concepts()` reports it (once per library object) and returns the others.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from myvlm.errors import MyVLMError
from myvlm.storage import (
    digest,
    explain_os_errors,
    parse_json,
    parse_tensors,
    read_bytes,
    tensor_bytes,
    write_bytes_atomic,
    write_json_atomic,
)

if TYPE_CHECKING:  # torch loads where vectors are read or written: listing and editing concepts need no torch
    import torch

FORMAT = "myvlm-concept/1"
MANIFEST, EMBEDDINGS, HEAD = "concept.json", "embeddings.safetensors", "head.safetensors"
TENSOR_FILES = (EMBEDDINGS, HEAD)
SHA256 = re.compile(r"^[0-9a-f]{64}$")
READ_ATTEMPTS = 5  # a reader racing a writer re-reads the manifest; a real mismatch survives every attempt
KINDS = ("person", "object")
NAME_PATTERN = re.compile(r"^[^\W_][\w .'-]*$")
MAX_NAME = 64


def default_library_path() -> Path:
    return Path(os.environ.get("MYVLM_HOME") or Path.home() / ".myvlm").expanduser()


def check_name(name: str, what: str = "concept name") -> str:
    if not isinstance(name, str) or not name.strip():
        raise MyVLMError(f"{what} is empty")
    name = name.strip()
    if len(name) > MAX_NAME:
        raise MyVLMError(f"{what} '{name[:20]}…' is too long ({len(name)} > {MAX_NAME} characters)")
    if "/" in name or "\\" in name or ".." in name or "\x00" in name:
        raise MyVLMError(f"{what} '{name}' may not contain path separators or '..'")
    if not NAME_PATTERN.match(name):
        raise MyVLMError(f"{what} '{name}' must start with a letter or digit and use letters, digits, space, . ' -")
    return name


def build_head(kind: str, photos, negatives=None, sources=None, encoder: str | None = None):
    """A concept head from a few photos: the main face of each for a person, an object head otherwise."""
    from myvlm.heads import DEFAULT_ENCODER, FaceHead, ObjectHead

    if kind == "person":
        return FaceHead.enroll(list(photos), sources=sources)
    return ObjectHead.train(list(photos), list(negatives) if negatives else None, encoder=encoder or DEFAULT_ENCODER)


@dataclass
class EmbeddingEntry:
    """What a concept's manifest says about its vector for one model (the vector itself is in the tensors file).

    `complete` is False for the checkpoint of an interrupted training; `together` describes a joint fine-tuning
    (`with`, `steps`, `seed`, `photos`, `final_loss`); keys this version does not know are kept in `extra`.
    """

    width: int | None = None
    saved: str | None = None
    family: str | None = None
    task: str | None = None
    seed: int | None = None
    source: str | None = None
    steps: int | None = None
    final_loss: float | None = None
    complete: bool = True
    stopped_early: str | None = None
    together: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, obj: dict) -> EmbeddingEntry:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in obj.items() if k in known}, extra={k: v for k, v in obj.items() if k not in known}
        )

    def to_manifest(self) -> dict:
        """The manifest object: fields that are set (and `complete`), then the unknown keys."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {k: v for k, v in values.items() if v is not None} | self.extra


@dataclass
class Concept:
    name: str
    identifier: str
    kind: str
    class_word: str | None
    created: str
    head: dict | None = None
    embeddings: dict[str, dict] = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)  # tensor file -> {"sha256", "bytes"[, "next"]}

    def uses(self, filename: str) -> bool:
        """Whether the concept has this tensor file (concepts without a head or an embedding have none)."""
        used = self.head is not None if filename == HEAD else bool(self.embeddings)
        return used or filename in self.files

    def embedding(self, model_id: str) -> EmbeddingEntry | None:
        """The manifest entry of this concept's vector for `model_id`, None if it has none."""
        entry = self.embeddings.get(model_id)
        return None if entry is None else EmbeddingEntry.from_manifest(entry)

    def manifest(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "identifier": self.identifier,
            "kind": self.kind,
            "class_word": self.class_word,
            "created": self.created,
            "head": self.head,
            "embeddings": self.embeddings,
            "files": self.files,
        }

    @classmethod
    def from_manifest(cls, obj: dict, where: Path) -> Concept:
        """Check every field, so a hand-edited or damaged manifest fails here and not deep inside a model."""
        if obj.get("format") != FORMAT:
            raise MyVLMError(f"{where}: not a myvlm concept manifest (format {obj.get('format')!r})")
        missing = [key for key in ("name", "identifier", "kind", "created") if key not in obj]
        if missing:
            raise MyVLMError(f"{where}: corrupted manifest (missing {', '.join(missing)})")
        concept = cls(
            name=obj["name"],
            identifier=obj["identifier"],
            kind=obj["kind"],
            class_word=obj.get("class_word"),
            created=obj["created"],
            head=obj.get("head"),
            embeddings=obj.get("embeddings") or {},
            files=obj.get("files") or {},  # absent in manifests of earlier versions: their files are not checked
        )
        try:
            if check_name(concept.name) != where.parent.name:
                raise MyVLMError(f"name '{concept.name}' does not match its folder")
            check_name(concept.identifier, "identifier")
        except MyVLMError as error:
            raise MyVLMError(f"{where}: corrupted manifest ({error})") from None
        if concept.kind not in KINDS:
            raise MyVLMError(f"{where}: corrupted manifest (kind {concept.kind!r})")
        if not isinstance(concept.head, dict | None) or not isinstance(concept.class_word, str | None):
            raise MyVLMError(f"{where}: corrupted manifest (head or class_word has the wrong type)")
        entries = concept.embeddings
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise MyVLMError(f"{where}: corrupted manifest (embeddings must map model ids to objects)")
        files = concept.files
        if not isinstance(files, dict) or not all(
            name in TENSOR_FILES and _is_record(record) for name, record in files.items()
        ):
            raise MyVLMError(f"{where}: corrupted manifest (files must map tensor files to their sha256 and size)")
        return concept


def _is_record(record, *, pending: bool = True) -> bool:
    """{"sha256": hex, "bytes": int}, plus the same for the file a writer was putting in its place ("next")."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("sha256"), str)
        and bool(SHA256.match(record["sha256"]))
        and type(record.get("bytes")) is int
        and ("next" not in record or (pending and _is_record(record["next"], pending=False)))
    )


def _matches(data: bytes, record: dict) -> bool:
    """Whether the file is the one the manifest records, or the one a writer was replacing it with ("next")."""
    found = digest(data)
    return any(r is not None and r["sha256"] == found["sha256"] for r in (record, record.get("next")))


def _mismatch(path: Path, data: bytes, record: dict) -> str:
    if len(data) not in (record["bytes"], record.get("next", {}).get("bytes")):
        return f"{path}: damaged ({len(data)} bytes, the manifest recorded {record['bytes']}: truncated or overwritten)"
    return f"{path}: damaged (its sha256 differs from the one {MANIFEST} recorded: the file changed on disk)"


class DamagedConceptWarning(UserWarning):
    """A concept of the library cannot be read and was skipped."""


@dataclass
class ConceptStatus:
    """One concept as `check` finds it: `concept` when it is usable, else `error` says which file is damaged how."""

    name: str
    concept: Concept | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def unchecked(self) -> list[str]:
        """Tensor files with no recorded checksum (written by an earlier myvlm): damage inside them may go unseen."""
        concept = self.concept
        return [f for f in TENSOR_FILES if concept and concept.uses(f) and f not in concept.files]


class ConceptLibrary:
    """A folder of concepts, defaulting to $MYVLM_HOME or ~/.myvlm.

    `on_damage(name, error)` hears of each damaged concept that `concepts()` skips, once per library object; by
    default it is a DamagedConceptWarning."""

    lock_timeout = 60.0  # seconds to wait for another process's write (a training saves within milliseconds)

    def __init__(
        self, root: str | os.PathLike | None = None, *, on_damage: Callable[[str, str], None] | None = None
    ) -> None:
        self.root = Path(root).expanduser() if root is not None else default_library_path()
        if self.root.exists() and not self.root.is_dir():
            raise MyVLMError(f"{self.root}: library path is a file, not a folder")
        self.on_damage = on_damage
        self.damaged: dict[str, str] = {}  # name -> error of each concept `concepts()` skipped

    # --- reading --------------------------------------------------------------------------------------------------
    def _folder(self, name: str) -> Path:
        folder = self.root / check_name(name)
        if folder.resolve().parent != self.root.resolve():
            raise MyVLMError(f"concept name '{name}' points outside the library")
        return folder

    def _file(self, name: str, filename: str) -> Path:
        """A concept's file; symbolic links are refused so that nothing outside the library is ever read."""
        path = self._folder(name) / filename
        if path.is_symlink():
            raise MyVLMError(f"{path}: is a symbolic link; a library only reads its own files")
        return path

    def _concept_folders(self) -> list[Path]:
        """Visible real folders; hidden ones are temporaries of a writer (possibly killed) and never concepts."""
        if not self.root.is_dir():
            return []
        with explain_os_errors(self.root):
            entries = sorted(self.root.iterdir())
        return [f for f in entries if not f.name.startswith(".") and f.is_dir() and not f.is_symlink()]

    def _names(self) -> list[str]:
        """Folders holding a manifest, damaged or not."""
        return [folder.name for folder in self._concept_folders() if (folder / MANIFEST).is_file()]

    def _manifest(self, name: str) -> tuple[Concept, bytes]:
        path = self._file(name, MANIFEST)
        if not path.is_file():
            raise MyVLMError(f"no concept named '{name}' in {self.root} (known: {', '.join(self._names()) or 'none'})")
        raw = read_bytes(path)
        return Concept.from_manifest(parse_json(path, raw), path), raw

    def check_identifier(self, identifier: str, owner: str | None = None) -> str:
        """The identifier, checked and free: no concept but `owner` says it (read from the manifests alone, so it is
        cheap enough to call before a head is built; a damaged manifest holds no identifier to compare)."""
        identifier = check_name(identifier, "identifier")
        for other in self._names():
            try:
                used = self._manifest(other)[0].identifier
            except MyVLMError:
                continue
            if other != owner and used.casefold() == identifier.casefold():
                raise MyVLMError(f"identifier '{identifier}' is already used by concept '{other}'")
        return identifier

    def _checked(self, concept: Concept, filename: str) -> bytes:
        path = self._file(concept.name, filename)
        data = read_bytes(path)
        record = concept.files.get(filename)
        if record is not None and not _matches(data, record):
            raise MyVLMError(_mismatch(path, data, record))
        return data

    def _read(self, name: str, wanted: tuple[str, ...]) -> tuple[Concept, dict[str, bytes]]:
        """The manifest and the bytes of the `wanted` tensor files the concept has, each checked against the
        manifest. A writer replaces a tensor file between two manifest writes, so a mismatch is damage only if the
        manifest did not change meanwhile; otherwise the manifest is read again."""
        attempt = 1
        while True:
            concept, raw = self._manifest(name)
            try:
                return concept, {f: self._checked(concept, f) for f in wanted if concept.uses(f)}
            except MyVLMError:
                if attempt == READ_ATTEMPTS or not self._manifest_changed(name, raw):
                    raise
            attempt += 1

    def _manifest_changed(self, name: str, raw: bytes) -> bool:
        try:
            return read_bytes(self._file(name, MANIFEST)) != raw
        except MyVLMError:  # gone: the concept was removed meanwhile, and the first error stands
            return False

    def get(self, name: str) -> Concept:
        """The concept, its manifest and the checksums of its tensor files verified."""
        return self._read(name, TENSOR_FILES)[0]

    def __contains__(self, name: str) -> bool:
        return (self._folder(name) / MANIFEST).is_file()

    def _head(self, concept: Concept, data: bytes):
        from myvlm.heads import head_from_state

        path = self._file(concept.name, HEAD)
        tensors = parse_tensors(path, data)
        try:
            head = head_from_state(concept.head, tensors)
            shapes = {k: v for k, v in head.config().items() if k in ("dim", "faces") and k in concept.head}
        except MyVLMError as error:
            raise MyVLMError(f"{path}: corrupted concept head ({error})") from None
        except Exception as error:  # whatever the head's own code trips over in a damaged file is that damage
            raise MyVLMError(f"{path}: corrupted concept head ({type(error).__name__}: {error})") from None
        wrong = [f"{k} {v}, the manifest says {concept.head[k]}" for k, v in shapes.items() if concept.head[k] != v]
        if wrong:
            raise MyVLMError(f"{path}: corrupted concept head ({'; '.join(wrong)})")
        return head

    def _vector(self, concept: Concept, tensors: dict, model_id: str, width: int | None = None) -> torch.Tensor:
        import torch

        name = concept.name
        if model_id not in tensors:
            raise MyVLMError(f"concept '{name}': embeddings file lacks the vector for {model_id} (corrupted)")
        vector = tensors[model_id].float().reshape(-1)
        recorded = concept.embeddings[model_id].get("width")
        if recorded is not None and vector.numel() != recorded:
            raise MyVLMError(
                f"concept '{name}': stored embedding for {model_id} has width {vector.numel()}, "
                f"the manifest says {recorded} (corrupted)"
            )
        if width is not None and vector.numel() != width:
            raise MyVLMError(
                f"concept '{name}': stored embedding for {model_id} has width {vector.numel()}, the model needs {width}"
            )
        if not torch.isfinite(vector).all():
            raise MyVLMError(f"concept '{name}': stored embedding for {model_id} is not finite (corrupted)")
        return vector

    def load_head(self, name: str):
        concept, data = self._read(name, (HEAD,))
        return None if concept.head is None else self._head(concept, data[HEAD])

    def load_embedding(self, name: str, model_id: str, width: int | None = None) -> torch.Tensor | None:
        """The concept's vector for `model_id`, or None if it was never trained for that model."""
        concept, data = self._read(name, (EMBEDDINGS,))
        if model_id not in concept.embeddings:
            return None
        tensors = parse_tensors(self._file(name, EMBEDDINGS), data[EMBEDDINGS])
        return self._vector(concept, tensors, model_id, width)

    def _verify(self, name: str) -> Concept:
        """Everything a command could read of the concept: manifest, checksums, every vector, the head."""
        concept, data = self._read(name, TENSOR_FILES)
        if concept.embeddings:
            tensors = parse_tensors(self._file(name, EMBEDDINGS), data[EMBEDDINGS])
            for model_id in concept.embeddings:
                self._vector(concept, tensors, model_id)
        if concept.head is not None:
            self._head(concept, data[HEAD])
        return concept

    def _status(self, name: str) -> ConceptStatus:
        try:
            return ConceptStatus(name, self._verify(name))
        except MyVLMError as error:
            return ConceptStatus(name, error=str(error))

    def check(self, name: str) -> ConceptStatus:
        """Verify one concept; a name that is not in the library is an error, a damaged concept a status."""
        if name not in self:
            self._manifest(name)  # raises: no concept named …
        return self._status(name)

    def scan(self) -> list[ConceptStatus]:
        """Every concept of the library, verified, the damaged ones included."""
        statuses = [self._status(name) for name in self._names()]
        # a concept removed while it was read is gone, not damaged
        return [s for s in statuses if s.ok or (self.root / s.name / MANIFEST).is_file()]

    def concepts(self) -> list[Concept]:
        """The usable concepts; each damaged one is reported to `on_damage` (once per library object) and skipped."""
        statuses = self.scan()
        found = {s.name: s.error for s in statuses if not s.ok}
        for name, error in found.items():
            if name not in self.damaged:
                self._report(name, error)
        self.damaged |= found
        return [s.concept for s in statuses if s.ok]

    def _report(self, name: str, error: str) -> None:
        if self.on_damage is not None:
            self.on_damage(name, error)
        else:
            warnings.warn(f"skipping damaged concept '{name}': {error}", DamagedConceptWarning, stacklevel=3)

    # --- writing --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the library lock; what a killed writer left behind is cleaned first."""
        with explain_os_errors(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / ".lock"), timeout=self.lock_timeout)
        with explain_os_errors(self.root):  # outside: filelock's Timeout is itself an OSError
            try:
                lock.acquire()
            except Timeout:
                raise MyVLMError(f"{self.root}: another myvlm process holds the library lock") from None
        try:
            self._remove_leftovers()
            yield
        finally:
            lock.release()

    def _remove_leftovers(self) -> None:
        """Delete what a killed writer left: hidden staging folders, renamed-away concepts and temporary files.
        Only called under the lock, when no other writer can be using them."""
        folders = self._concept_folders()
        leftovers = [*self.root.glob(".*.tmp"), *self.root.glob(".*.removed-*")]
        leftovers += [path for folder in folders for path in folder.glob(".*.tmp")]
        for path in leftovers:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()

    def create(
        self,
        name: str,
        *,
        kind: str,
        identifier: str | None = None,
        class_word: str | None = None,
        head=None,
        photos=None,
        negatives=None,
    ) -> Concept:
        """Add a new concept; it appears in the library complete or not at all. Its head detects it in photos (a
        concept without one is never inserted by `use_library` / `myvlm caption`): give `head`, or `photos` of it
        (PIL images) to build one here: `FaceHead.enroll(photos)` for a person, `ObjectHead.train(photos, negatives)`
        for an object."""
        name = check_name(name)
        identifier = check_name(identifier or name, "identifier")
        if kind not in KINDS:
            raise MyVLMError(f"kind must be 'person' or 'object', not '{kind}'")
        if photos is not None:
            if head is not None:
                raise MyVLMError("give a concept's head or photos to build it from, not both")
            head = build_head(kind, photos, negatives)
        with self._locked():
            for other in self._names():
                if other.casefold() == name.casefold():
                    raise MyVLMError(f"a concept named '{other}' already exists; remove it first or pick a new name")
            self.check_identifier(identifier)
            if self._folder(name).exists():
                raise MyVLMError(f"{self._folder(name)}: exists but is not a concept; move it out of the library")
            concept = Concept(
                name, identifier, kind, class_word, datetime.now(timezone.utc).isoformat(timespec="seconds")
            )
            with explain_os_errors(self.root):
                staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{name}.", suffix=".tmp"))
            try:
                if head is not None:
                    concept.head = head.config()
                    data = tensor_bytes(head.state_dict())
                    write_bytes_atomic(staging / HEAD, data)
                    concept.files[HEAD] = digest(data)
                write_json_atomic(staging / MANIFEST, concept.manifest())
                with explain_os_errors(self.root):
                    os.rename(staging, self._folder(name))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return concept

    def _replace(self, concept: Concept, filename: str, data: bytes, current: bytes | None) -> None:
        """Replace a tensor file so that the manifest on disk always vouches for the file on disk: first the
        manifest accepts the current file or the new one, then the file is replaced; the caller's next manifest
        write records the new one alone. A crash between any two steps leaves a concept that reads as whole."""
        folder = self._folder(concept.name)
        if filename in concept.files and current is not None:
            concept.files[filename] = {**digest(current), "next": digest(data)}
            write_json_atomic(folder / MANIFEST, concept.manifest())
        write_bytes_atomic(folder / filename, data)
        concept.files[filename] = digest(data)

    def edit(self, name: str, *, identifier: str | None = None, class_word: str | None = None) -> Concept:
        """Change a concept's identifier and/or class word (None keeps it) in one atomic manifest write."""
        if identifier is not None:
            identifier = check_name(identifier, "identifier")
        if class_word is not None:
            class_word = check_name(class_word, "class word")
        with self._locked():
            concept = self.get(name)
            if identifier is not None:
                concept.identifier = self.check_identifier(identifier, owner=concept.name)
            if class_word is not None:
                concept.class_word = class_word
            write_json_atomic(self._folder(name) / MANIFEST, concept.manifest())
            return concept

    def save_head(self, name: str, head) -> None:
        """Replace a concept's head (e.g. re-calibrated against a new concept of the same class word)."""
        with self._locked():
            concept, data = self._read(name, (HEAD,))
            self._replace(concept, HEAD, tensor_bytes(head.state_dict()), data.get(HEAD))
            concept.head = head.config()
            write_json_atomic(self._folder(name) / MANIFEST, concept.manifest())

    def save_embedding(
        self, name: str, model_id: str, vector: torch.Tensor, entry: EmbeddingEntry | None = None, **info
    ) -> None:
        """Store the vector for one model with its manifest entry (`entry`, and/or its fields as keywords); other
        models' vectors are kept. Tensors first, then the manifest."""
        if entry is not None:
            info = {k: v for k, v in entry.to_manifest().items() if k not in ("width", "saved")} | info
        import torch

        vector = torch.as_tensor(vector).detach().float().reshape(-1).cpu()
        if not torch.isfinite(vector).all():
            raise MyVLMError(f"concept '{name}': refusing to store a non-finite embedding")
        with self._locked():
            concept, data = self._read(name, (EMBEDDINGS,))
            folder = self._folder(name)
            current = data.get(EMBEDDINGS)
            tensors = parse_tensors(folder / EMBEDDINGS, current) if current is not None else {}
            tensors = {k: v for k, v in tensors.items() if k in concept.embeddings}
            tensors[model_id] = vector
            self._replace(concept, EMBEDDINGS, tensor_bytes(tensors), current)
            concept.embeddings[model_id] = {
                "width": vector.numel(),
                "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **info,
            }
            write_json_atomic(folder / MANIFEST, concept.manifest())

    def remove(self, name: str) -> None:
        """Rename the folder away first (atomic), then delete it, so a crash never leaves half a concept. A damaged
        concept is removable too; a stray folder without a manifest is not."""
        with self._locked():
            folder = self._folder(name)
            if not (folder / MANIFEST).is_file():
                self._manifest(name)  # raises: no concept named …
            trash = self.root / f".{folder.name}.removed-{os.getpid()}"
            with explain_os_errors(folder):
                os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
