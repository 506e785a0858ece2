"""Crash-safe file writes: temporary file, fsync, rename. A reader never sees a half-written file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from myvlm.errors import MyVLMError

if TYPE_CHECKING:  # torch and safetensors load in the functions that use them: `myvlm concept list` needs neither
    import torch


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def explain_os_errors(what: Path) -> Iterator[None]:
    """Turn read-only folders and full disks into one-line errors."""
    try:
        yield
    except PermissionError:
        raise MyVLMError(f"{what}: permission denied (is the library read-only?)") from None
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise MyVLMError(f"{what}: disk is full; nothing was changed") from None
        if error.errno == errno.EROFS:
            raise MyVLMError(f"{what}: read-only file system") from None
        raise MyVLMError(f"{what}: {error.strerror or error}") from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with explain_os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: dict) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MyVLMError(f"{path}: missing") from None
    except OSError as error:
        raise MyVLMError(f"{path}: cannot read ({error.strerror or error})") from None


def parse_json(path: Path, data: bytes) -> dict:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise MyVLMError(f"{path}: corrupted JSON ({error})") from None
    if not isinstance(obj, dict):
        raise MyVLMError(f"{path}: corrupted (expected a JSON object)")
    return obj


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save as save_safetensors_bytes

    return save_safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def parse_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    """Only safetensors is ever read from a library: no pickle, whatever the file claims to be."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors_bytes

    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        detail = (str(error).strip() or type(error).__name__).splitlines()[0][:200]
        raise MyVLMError(f"{path}: corrupted tensor file ({detail})") from None


def digest(data: bytes) -> dict:
    """What a manifest records of a file it vouches for: its sha256 and size."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
