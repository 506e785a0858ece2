"""Registry of VLM families: the backend is picked from the model's config, so adding a family is one new file."""

from __future__ import annotations

from myvlm.backends.base import CAPTION, TASKS, VQA, Backend, Batch, Injection
from myvlm.backends.blip2 import Blip2Backend
from myvlm.backends.llava import LlavaBackend
from myvlm.errors import MyVLMError

BACKENDS: dict[str, type[Backend]] = {}


def register_backend(backend: type[Backend]) -> type[Backend]:
    for model_type in backend.model_types:
        BACKENDS[model_type] = backend
    return backend


def backend_for(model_type: str) -> type[Backend]:
    try:
        return BACKENDS[model_type]
    except KeyError:
        supported = ", ".join(sorted(BACKENDS))
        raise MyVLMError(f"model type '{model_type}' is not supported (supported: {supported})") from None


register_backend(Blip2Backend)
register_backend(LlavaBackend)

__all__ = ["CAPTION", "TASKS", "VQA", "Backend", "Batch", "Injection", "backend_for", "register_backend"]
