"""myvlm: personalize vision-language models (BLIP-2, LLaVA, Qwen2-VL, Idefics3, PaliGemma, ...) to your own concepts.

import myvlm
vlm = myvlm.load("toy-llava")                       # or a hub id / local folder of a supported VLM
result = vlm.learn("bobby", "Bobby", images, captions)
vlm.caption(images, concepts=[["bobby"]] * len(images))
head = myvlm.ObjectHead.train(images)                # or myvlm.FaceHead.enroll(photos) for a person

Names are imported on first use, so `import myvlm` (and the `myvlm` command) starts without loading torch.
"""

from __future__ import annotations

import importlib

from myvlm.errors import MyVLMError as MyVLMError  # light: no torch

__version__ = "0.1.0"

_EXPORTS = {
    "CAPTION": "myvlm.backends",
    "VQA": "myvlm.backends",
    "Backend": "myvlm.backends",
    "load_image": "myvlm.images",
    "Concept": "myvlm.library",
    "ConceptLibrary": "myvlm.library",
    "Caption": "myvlm.model",
    "PersonalizedVLM": "myvlm.model",
    "load": "myvlm.model",
    "load_official_embedding": "myvlm.official",
    "FaceHead": "myvlm.heads",
    "ObjectHead": "myvlm.heads",
    "Example": "myvlm.training",
    "TrainingConfig": "myvlm.training",
    "TrainingResult": "myvlm.training",
    "caption_examples": "myvlm.training",
    "learn_concept": "myvlm.training",
    "learn_together": "myvlm.training",
    "with_identifier": "myvlm.text",
    "ConceptEmbeddings": "myvlm.embeddings",
}

__all__ = sorted([*_EXPORTS, "MyVLMError"])


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'myvlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
