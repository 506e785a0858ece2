"""Registry of VLM families: the backend is picked from the model's `model_type`. Every module in this package is
imported here, and each backend class registers its model types itself, so adding a family is adding one file."""

from __future__ import annotations

import importlib
import pkgutil

from myvlm.backends.base import BACKENDS, CAPTION, TASKS, VQA, Backend, Batch, Injection, backend_for

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BACKENDS", "CAPTION", "TASKS", "VQA", "Backend", "Batch", "Injection", "backend_for"]
