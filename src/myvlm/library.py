"""The concept library: one folder per concept, a JSON manifest plus safetensors files.

    <library>/<name>/concept.json          name, identifier, kind, class word, created, head config, embeddings index
    <library>/<name>/embeddings.safetensors one vector per model id (key = model id)
    <library>/<name>/head.safetensors       the concept head's parameters

Writes are atomic and serialized by a lock file, so a crash or a second process never leaves a half-written concept.
A new concept is built in a hidden temporary folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from myvlm.errors import MyVLMError
from myvlm.storage import explain_os_errors, read_json, read_tensors, write_json_atomic, write_tensors_atomic

if TYPE_CHECKING:  # torch loads where vectors are read or written: listing and editing concepts need no torch
    import torch

FORMAT = "myvlm-concept/1"
MANIFEST, EMBEDDINGS, HEAD = "concept.json", "embeddings.safetensors", "head.safetensors"
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
class Concept:
    name: str
    identifier: str
    kind: str
    class_word: str | None
    created: str
    head: dict | None = None
    embeddings: dict[str, dict] = field(default_factory=dict)

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
        return concept


class ConceptLibrary:
    """A folder of concepts, defaulting to $MYVLM_HOME or ~/.myvlm."""

    lock_timeout = 60.0  # seconds to wait for another process's write (a training saves within milliseconds)

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_library_path()
        if self.root.exists() and not self.root.is_dir():
            raise MyVLMError(f"{self.root}: library path is a file, not a folder")

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

    def concepts(self) -> list[Concept]:
        return [self.get(folder.name) for folder in self._concept_folders() if (folder / MANIFEST).is_file()]

    def get(self, name: str) -> Concept:
        manifest = self._file(name, MANIFEST)
        if not manifest.is_file():
            known = ", ".join(c.name for c in self.concepts()) or "none"
            raise MyVLMError(f"no concept named '{name}' in {self.root} (known: {known})")
        return Concept.from_manifest(read_json(manifest), manifest)

    def __contains__(self, name: str) -> bool:
        return (self._folder(name) / MANIFEST).is_file()

    def load_head(self, name: str):
        from myvlm.heads import head_from_state

        concept = self.get(name)
        if concept.head is None:
            return None
        path = self._file(name, HEAD)
        tensors = read_tensors(path)
        try:
            return head_from_state(concept.head, tensors)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise MyVLMError(f"{path}: corrupted concept head ({type(error).__name__}: {error})") from None

    def load_embedding(self, name: str, model_id: str, width: int | None = None) -> torch.Tensor | None:
        """The concept's vector for `model_id`, or None if it was never trained for that model."""
        import torch

        concept = self.get(name)
        entry = concept.embeddings.get(model_id)
        if entry is None:
            return None
        tensors = read_tensors(self._file(name, EMBEDDINGS))
        if model_id not in tensors:
            raise MyVLMError(f"concept '{name}': embeddings file lacks the vector for {model_id} (corrupted)")
        vector = tensors[model_id].float().reshape(-1)
        if width is not None and vector.numel() != width:
            raise MyVLMError(
                f"concept '{name}': stored embedding for {model_id} has width {vector.numel()}, the model needs {width}"
            )
        if not torch.isfinite(vector).all():
            raise MyVLMError(f"concept '{name}': stored embedding for {model_id} is not finite (corrupted)")
        return vector

    # --- writing --------------------------------------------------------------------------------------------------
    def _lock(self) -> FileLock:
        with explain_os_errors(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"), timeout=self.lock_timeout)

    def _locked(self):
        lock = self._lock()
        with explain_os_errors(self.root):  # outside: filelock's Timeout is itself an OSError
            try:
                lock.acquire()
            except Timeout:
                raise MyVLMError(f"{self.root}: another myvlm process holds the library lock") from None
        self._remove_leftovers()
        return lock

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
        lock = self._locked()
        try:
            for other in self.concepts():
                if other.name.casefold() == name.casefold():
                    raise MyVLMError(
                        f"a concept named '{other.name}' already exists; remove it first or pick a new name"
                    )
                if other.identifier.casefold() == identifier.casefold():
                    raise MyVLMError(f"identifier '{identifier}' is already used by concept '{other.name}'")
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
                    write_tensors_atomic(staging / HEAD, head.state_dict())
                write_json_atomic(staging / MANIFEST, concept.manifest())
                with explain_os_errors(self.root):
                    os.rename(staging, self._folder(name))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return concept
        finally:
            lock.release()

    def edit(self, name: str, *, identifier: str | None = None, class_word: str | None = None) -> Concept:
        """Change a concept's identifier and/or class word (None keeps it) in one atomic manifest write."""
        lock = self._locked()
        try:
            concept = self.get(name)
            if identifier is not None:
                identifier = check_name(identifier, "identifier")
                for other in self.concepts():
                    if other.name != concept.name and other.identifier.casefold() == identifier.casefold():
                        raise MyVLMError(f"identifier '{identifier}' is already used by concept '{other.name}'")
                concept.identifier = identifier
            if class_word is not None:
                concept.class_word = check_name(class_word, "class word")
            write_json_atomic(self._folder(name) / MANIFEST, concept.manifest())
            return concept
        finally:
            lock.release()

    def save_head(self, name: str, head) -> None:
        lock = self._locked()
        try:
            concept = self.get(name)
            write_tensors_atomic(self._folder(name) / HEAD, head.state_dict())
            concept.head = head.config()
            write_json_atomic(self._folder(name) / MANIFEST, concept.manifest())
        finally:
            lock.release()

    def save_embedding(self, name: str, model_id: str, vector: torch.Tensor, **info) -> None:
        """Store the vector for one model; other models' vectors are kept. Tensors first, then the manifest."""
        import torch

        vector = torch.as_tensor(vector).detach().float().reshape(-1).cpu()
        if not torch.isfinite(vector).all():
            raise MyVLMError(f"concept '{name}': refusing to store a non-finite embedding")
        lock = self._locked()
        try:
            concept = self.get(name)
            folder = self._folder(name)
            tensors = read_tensors(folder / EMBEDDINGS) if (folder / EMBEDDINGS).exists() else {}
            tensors = {k: v for k, v in tensors.items() if k in concept.embeddings}
            tensors[model_id] = vector
            write_tensors_atomic(folder / EMBEDDINGS, tensors)
            concept.embeddings[model_id] = {
                "width": vector.numel(),
                "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **info,
            }
            write_json_atomic(folder / MANIFEST, concept.manifest())
        finally:
            lock.release()

    def remove(self, name: str) -> None:
        """Rename the folder away first (atomic), then delete it, so a crash never leaves half a concept."""
        lock = self._locked()
        try:
            folder = self._folder(name)
            if not (folder / MANIFEST).is_file():  # a damaged manifest is still removable, a stray folder is not
                self.get(name)
            trash = self.root / f".{folder.name}.removed-{os.getpid()}"
            with explain_os_errors(folder):
                os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
        finally:
            lock.release()
