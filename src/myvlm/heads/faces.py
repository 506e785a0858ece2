"""Person concepts: find every face, describe it, and match it to the nearest enrolled face of any person."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from myvlm.errors import MyVLMError
from myvlm.heads.encoders import installed_model_file

DEFAULT_FACE_BACKEND = "dlib"
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Face:
    box: Box
    descriptor: torch.Tensor  # [dim] float32

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


class FaceBackend(Protocol):
    """Detector plus descriptor; `distance_threshold` is the measured default under which two faces match."""

    name: str
    dim: int
    distance_threshold: float

    def faces(self, image: Image.Image) -> list[Face]: ...

    def distances(self, queries: torch.Tensor, enrolled: torch.Tensor) -> torch.Tensor: ...


class DlibFaceBackend:
    """Offline default: dlib HOG detector, 5-point alignment and the 128-d ResNet descriptor (Euclidean distance).

    0.5 is the default threshold: on our benchmark photos same-person distances stay under 0.45 and different people
    sit above 0.55 (dlib's own 0.6 suggestion is tuned for recall on LFW, we prefer never naming a stranger).
    """

    name = "dlib"
    dim = 128
    distance_threshold = 0.5
    upsample_below = 1600  # upsample smaller photos once so the faces in group photos (~40 px) are found

    def __init__(self):
        import dlib

        self.detector = dlib.get_frontal_face_detector()
        package = "face_recognition_models"
        self.landmarks = dlib.shape_predictor(
            str(installed_model_file(package, "models", "shape_predictor_5_face_landmarks.dat"))
        )
        self.describer = dlib.face_recognition_model_v1(
            str(installed_model_file(package, "models", "dlib_face_recognition_resnet_model_v1.dat"))
        )
        self.lock = threading.Lock()  # dlib models are not documented as thread-safe

    def faces(self, image: Image.Image) -> list[Face]:
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        upsample = 1 if max(image.size) < self.upsample_below else 0
        found = []
        with self.lock:
            for rect in self.detector(pixels, upsample):
                descriptor = self.describer.compute_face_descriptor(pixels, self.landmarks(pixels, rect))
                box = (
                    float(max(rect.left(), 0)),
                    float(max(rect.top(), 0)),
                    float(min(rect.right(), image.width)),
                    float(min(rect.bottom(), image.height)),
                )
                found.append(Face(box, torch.tensor(np.asarray(descriptor), dtype=torch.float32)))
        return found

    def distances(self, queries: torch.Tensor, enrolled: torch.Tensor) -> torch.Tensor:
        return torch.cdist(queries, enrolled)


class InsightFaceBackend:
    """For users with insightface and its `buffalo_l` models: ArcFace embeddings, cosine distance (1 - cosine).

    The 0.65 default (cosine similarity 0.35) follows the usual ArcFace operating point; it is not measured here.
    """

    name = "insightface"
    dim = 512
    distance_threshold = 0.65

    def __init__(self, model_name: str = "buffalo_l"):
        try:
            from insightface.app import FaceAnalysis
        except ImportError:
            raise MyVLMError(
                "face backend 'insightface' needs `pip install insightface onnxruntime` and its buffalo_l models"
            ) from None
        try:
            self.app = FaceAnalysis(name=model_name, providers=["CPUExecutionProvider"])
            self.app.prepare(ctx_id=-1, det_size=(640, 640))
        except Exception as error:  # insightface raises bare asserts/OSErrors when its model folder is missing
            raise MyVLMError(f"insightface could not load its {model_name!r} models ({error})") from None

    def faces(self, image: Image.Image) -> list[Face]:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        return [
            Face(tuple(float(v) for v in face.bbox), torch.tensor(face.normed_embedding, dtype=torch.float32))
            for face in self.app.get(bgr)
        ]

    def distances(self, queries: torch.Tensor, enrolled: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(enrolled, dim=-1).T


_BACKENDS: dict[str, Callable[[], FaceBackend]] = {"dlib": DlibFaceBackend, "insightface": InsightFaceBackend}
_BACKEND_CACHE: dict[str, FaceBackend] = {}
_LOCK = threading.Lock()


def get_face_backend(name: str = DEFAULT_FACE_BACKEND) -> FaceBackend:
    """Load a face backend once per process (the dlib models take a second and 30 MB)."""
    with _LOCK:
        if name not in _BACKEND_CACHE:
            if name not in _BACKENDS:
                raise MyVLMError(f"unknown face backend {name!r}; choose one of: {', '.join(sorted(_BACKENDS))}")
            _BACKEND_CACHE[name] = _BACKENDS[name]()
        return _BACKEND_CACHE[name]


def _photo_name(sources: Sequence[str] | None, index: int) -> str:
    return str(sources[index]) if sources is not None else f"photo #{index + 1}"


class FaceHead:
    """A person concept: the main face of each enrolment photo; it fires when a face is close to one of them."""

    kind = "person"

    def __init__(self, descriptors: torch.Tensor, backend: str = DEFAULT_FACE_BACKEND, threshold: float | None = None):
        if descriptors.ndim != 2 or len(descriptors) == 0:
            raise MyVLMError("a person concept needs at least one enrolled face")
        self.descriptors = descriptors.float()
        self.backend_name = backend
        self.threshold = float(threshold if threshold is not None else get_face_backend(backend).distance_threshold)

    @property
    def backend(self) -> FaceBackend:
        return get_face_backend(self.backend_name)

    @classmethod
    def enroll(
        cls,
        images: Sequence[Image.Image],
        sources: Sequence[str] | None = None,
        backend: str = DEFAULT_FACE_BACKEND,
        threshold: float | None = None,
    ) -> FaceHead:
        """Keep the largest face of each photo; `sources` (file names) make the no-face error point at the photo."""
        if not images:
            raise MyVLMError("no photos given to enrol this person")
        face_backend = get_face_backend(backend)
        descriptors = []
        for index, image in enumerate(images):
            faces = face_backend.faces(image)
            if not faces:
                raise MyVLMError(f"{_photo_name(sources, index)}: no face found; use a clear, frontal photo")
            descriptors.append(max(faces, key=lambda face: face.area).descriptor)
        return cls(torch.stack(descriptors), backend, threshold)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"descriptors": self.descriptors.contiguous()}

    def config(self) -> dict:
        return {
            "type": "face",
            "kind": self.kind,
            "backend": self.backend_name,
            "threshold": self.threshold,
            "dim": int(self.descriptors.shape[1]),
            "faces": int(self.descriptors.shape[0]),
        }

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> FaceHead:
        return cls(tensors["descriptors"], config["backend"], config["threshold"])
