"""Concept heads: decide which of the user's concepts (people, objects) appear in a photo."""

from myvlm.heads.detector import ConceptDetector, Detection, head_from_state
from myvlm.heads.encoders import (
    DEFAULT_ENCODER,
    ImageEncoder,
    available_encoders,
    embed_regions,
    get_encoder,
    register_encoder,
    register_open_clip_encoder,
    register_transformers_encoder,
)
from myvlm.heads.faces import DEFAULT_FACE_BACKEND, FaceHead, get_face_backend
from myvlm.heads.objects import ObjectHead

__all__ = [
    "DEFAULT_ENCODER",
    "DEFAULT_FACE_BACKEND",
    "ConceptDetector",
    "Detection",
    "FaceHead",
    "ImageEncoder",
    "ObjectHead",
    "available_encoders",
    "embed_regions",
    "get_encoder",
    "get_face_backend",
    "head_from_state",
    "register_encoder",
    "register_open_clip_encoder",
    "register_transformers_encoder",
]
