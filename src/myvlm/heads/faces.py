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

    `distance_threshold` is the most a person's threshold may be (each person's own is usually lower, see
    `FaceHead.enroll`): dlib's own 0.6 is tuned for recall on LFW, and we prefer a miss to naming a stranger.
    `same_person_distance` (dlib's 0.6) only checks that enrolment photos show one person.
    """

    name = "dlib"
    dim = 128
    distance_threshold = 0.5
    same_person_distance = 0.6
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
    same_person_distance = 0.72  # cosine similarity 0.28, not measured here

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


# A person's threshold is at most this times the mean distance between their own enrolment faces: a new photo of
# someone whose enrolment faces lie close together lands close to them too, so a stranger need not be let in as far
# as the backend's cap (chosen by cross-validation across identities, benchmarks/RESULTS.md).
SPREAD_FACTOR = 1.4
# ... but never under this fraction of the cap: near-duplicate enrolment photos say nothing about the next photo.
MIN_THRESHOLD_FRACTION = 0.8


def _photo_name(sources: Sequence[str] | None, index: int) -> str:
    return str(sources[index]) if sources is not None else f"photo #{index + 1}"


def _components(distances: torch.Tensor, limit: float) -> list[list[int]]:
    """Groups of faces linked by chains of distances under `limit` (one group: one person)."""
    groups: list[list[int]] = []
    unseen = set(range(len(distances)))
    while unseen:
        stack, group = [min(unseen)], []
        unseen.discard(stack[0])
        while stack:
            index = stack.pop()
            group.append(index)
            linked = [other for other in unseen if distances[index, other] < limit]
            unseen.difference_update(linked)
            stack += linked
        groups.append(sorted(group))
    return groups


def person_threshold(descriptors: torch.Tensor, backend: FaceBackend) -> float:
    """The backend's cap, or less when the person's own enrolment faces lie closer together than it implies."""
    if len(descriptors) < 2:
        return float(backend.distance_threshold)
    pairwise = backend.distances(descriptors, descriptors)
    spread = float(pairwise[~torch.eye(len(descriptors), dtype=torch.bool)].mean())
    cap = float(backend.distance_threshold)
    return min(cap, max(MIN_THRESHOLD_FRACTION * cap, SPREAD_FACTOR * spread))


class FaceHead:
    """A person concept: the main face of each enrolment photo; it fires when a face is closer to one of them than
    the person's own threshold (`person_threshold`)."""

    kind = "person"

    def __init__(self, descriptors: torch.Tensor, backend: str = DEFAULT_FACE_BACKEND, threshold: float | None = None):
        if descriptors.ndim != 2 or len(descriptors) == 0:
            raise MyVLMError("a person concept needs at least one enrolled face")
        self.descriptors = descriptors.float()
        self.backend_name = backend
        self.threshold = float(threshold if threshold is not None else get_face_backend(backend).distance_threshold)
        self.notes: list[str] = []  # what enrolment chose on the user's behalf (one line each, for the CLI to show)

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
        """One face per photo: the only face, or in a photo with several the one closest to the other photos' faces
        (the largest when no photo has a single face). Refuses photos that show different people; `sources` (file
        names) make errors and notes point at the photo."""
        if not images:
            raise MyVLMError("no photos given to enrol this person")
        face_backend = get_face_backend(backend)
        found = []
        for index, image in enumerate(images):
            faces = face_backend.faces(image)
            if not faces:
                raise MyVLMError(f"{_photo_name(sources, index)}: no face found; use a clear, frontal photo")
            found.append(faces)
        anchors = [faces[0].descriptor for faces in found if len(faces) == 1]
        chosen, notes = [], []
        for index, faces in enumerate(found):
            if len(faces) == 1:
                chosen.append(faces[0])
                continue
            if anchors:
                nearest = face_backend.distances(torch.stack([face.descriptor for face in faces]), torch.stack(anchors))
                face, why = faces[int(nearest.min(1).values.argmin())], "closest to the faces of the other photos"
            else:
                face, why = max(faces, key=lambda face: face.area), "the largest"
            chosen.append(face)
            order = sorted(faces, key=lambda other: other.box[0]).index(face) + 1
            box = ", ".join(str(round(v)) for v in face.box)
            notes.append(
                f"{_photo_name(sources, index)}: {len(faces)} faces; enrolled face {order} from the left "
                f"(box {box}), {why}"
            )
        descriptors = torch.stack([face.descriptor for face in chosen])
        groups = _components(face_backend.distances(descriptors, descriptors), face_backend.same_person_distance)
        if len(groups) > 1:
            described = "; ".join(" + ".join(_photo_name(sources, index) for index in group) for group in groups)
            raise MyVLMError(f"these photos show {len(groups)} different people ({described}); enrol each one apart")
        head = cls(
            descriptors, backend, threshold if threshold is not None else person_threshold(descriptors, face_backend)
        )
        head.notes = notes
        return head

    def held_out_scores(self) -> list[float]:
        """Each enrolled face's score (a detection's, 1 - distance) against the person's other faces: how a new photo
        of them would fare against 1 - `threshold`. Empty for one face."""
        if len(self.descriptors) < 2:
            return []
        distances = self.backend.distances(self.descriptors, self.descriptors)
        distances = distances.masked_fill(torch.eye(len(distances), dtype=torch.bool), float("inf"))  # not itself
        return (1.0 - distances.min(1).values).tolist()

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
