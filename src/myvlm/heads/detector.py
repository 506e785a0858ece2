"""Run every concept head over photos at once: one face pass and one encoder pass per image, one matmul for objects
(every region of every photo against every object head)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from myvlm.errors import MyVLMError
from myvlm.heads.encoders import ImageEncoder, embed_regions, get_encoder
from myvlm.heads.faces import FaceHead, get_face_backend
from myvlm.heads.objects import ObjectHead

Box = tuple[float, float, float, float]
NO_FACE_SCORE = float("-inf")


@dataclass(frozen=True)
class Detection:
    """A concept that fired. `score`: object heads give the calibrated probability (fires at >= threshold, 0.5 by
    default); person heads give 1 - face distance (fires when the distance is under the threshold). `box`: the face,
    or the object's best-scoring region, in pixels of the photo (left, top, right, bottom)."""

    concept: str
    score: float
    box: Box | None


def head_from_state(config: dict, tensors: dict[str, torch.Tensor]) -> FaceHead | ObjectHead:
    kinds = {"face": FaceHead, "object": ObjectHead}
    if config.get("type") not in kinds:
        raise MyVLMError(f"unknown concept head type {config.get('type')!r} (expected 'face' or 'object')")
    return kinds[config["type"]].from_state(config, tensors)


def _region_boxes(encoder: ImageEncoder, images: Sequence[Image.Image], regions: int) -> torch.Tensor | None:
    """[N, R, 4] region boxes as fractions of each photo: per photo where the encoder's regions depend on its shape
    (`region_boxes_of`), the same for every photo where they do not (`region_boxes`), the whole photo for one region."""
    if hasattr(encoder, "region_boxes_of"):
        return encoder.region_boxes_of(images, regions)
    region_boxes = getattr(encoder, "region_boxes", None)
    boxes = region_boxes() if region_boxes is not None else None
    if boxes is None and regions == 1:
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    return None if boxes is None else boxes[None].expand(len(images), -1, -1)


class ConceptDetector:
    """Concept detection for a set of named heads; every face is given to the nearest enrolled person only."""

    def __init__(self, heads: Mapping[str, FaceHead | ObjectHead], encoders: Mapping[str, ImageEncoder] | None = None):
        """`encoders`: encoder objects by name (e.g. a loaded VLM's vision tower); others come from the registry."""
        self.encoders = dict(encoders or {})
        self.face_heads = {name: head for name, head in heads.items() if isinstance(head, FaceHead)}
        self.object_groups: dict[str, tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        by_encoder: dict[str, list[str]] = {}
        for name, head in heads.items():
            if isinstance(head, ObjectHead):
                by_encoder.setdefault(head.encoder_name, []).append(name)
            elif not isinstance(head, FaceHead):
                raise MyVLMError(f"concept {name!r}: not a FaceHead or ObjectHead")
        for encoder_name, names in by_encoder.items():
            self.object_groups[encoder_name] = (
                names,
                torch.stack([heads[name].weight for name in names]),
                torch.stack([heads[name].bias for name in names]).reshape(-1),
                torch.tensor([heads[name].threshold for name in names]),
            )
        self.rivals = {
            name: set(getattr(head, "rivals", ())) for name, head in heads.items() if isinstance(head, ObjectHead)
        }
        self.person_groups: dict[str, list[str]] = {}
        for name, head in self.face_heads.items():
            self.person_groups.setdefault(head.backend_name, []).append(name)

    def _object_logits(self, images: Sequence[Image.Image]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per object concept: [N, R] logits of every region of every photo, and [N, R, 4] region boxes as fractions
        of each photo (None when the encoder does not say where its regions are)."""
        logits = {}
        for encoder_name, (names, weights, biases, _) in self.object_groups.items():
            encoder = self.encoders.get(encoder_name) or get_encoder(encoder_name)
            features = embed_regions(encoder, images)
            if features.shape[-1] != weights.shape[1]:
                raise MyVLMError(
                    f"encoder {encoder_name!r} gives {features.shape[-1]}-d features but {', '.join(names)} "
                    f"expect {weights.shape[1]}-d: retrain those concepts with this encoder"
                )
            boxes = _region_boxes(encoder, images, features.shape[1])
            per_region = features @ weights.T + biases  # [N, R, H]
            for index, name in enumerate(names):
                logits[name] = (per_region[..., index], boxes)
        return logits

    def _object_probabilities(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        return {name: torch.sigmoid(logits.amax(1)) for name, (logits, _) in self._object_logits(images).items()}

    def _face_distances(self, image: Image.Image) -> list[tuple[Box, dict[str, float]]]:
        """Per face found: its box and its distance to each person concept (nearest enrolled face)."""
        found = []
        for backend_name, names in self.person_groups.items():
            backend = get_face_backend(backend_name)
            for face in backend.faces(image):
                query = face.descriptor[None]
                found.append(
                    (
                        face.box,
                        {
                            name: float(backend.distances(query, self.face_heads[name].descriptors).min())
                            for name in names
                        },
                    )
                )
        return found

    def scores(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        """Raw score of every concept per image (person: best face's 1 - distance, -inf without faces)."""
        probabilities = self._object_probabilities(images)
        results = []
        for index, image in enumerate(images):
            row = {name: float(column[index]) for name, column in probabilities.items()}
            row.update({name: NO_FACE_SCORE for name in self.face_heads})
            for _, distances in self._face_distances(image) if self.face_heads else []:
                for name, distance in distances.items():
                    row[name] = max(row[name], 1.0 - distance)
            results.append(row)
        return results

    def _fired_objects(self, images: Sequence[Image.Image]) -> list[dict[str, Detection]]:
        """Object concepts that fired per image, each with its best region's box in pixels. Of two rival concepts
        (calibrated against each other, e.g. two dogs) firing on one photo, one is dropped when the other scores its
        best region higher: that region is the closer concept's."""
        thresholds = {
            name: float(threshold)
            for names, _, _, group_thresholds in self.object_groups.values()
            for name, threshold in zip(names, group_thresholds, strict=True)
        }
        logits = self._object_logits(images)
        results = []
        for index, image in enumerate(images):
            fired = {}
            for name, (scores, boxes) in logits.items():
                best = int(scores[index].argmax())
                probability = float(torch.sigmoid(scores[index, best]))
                if probability < thresholds[name]:
                    continue
                box = None
                if boxes is not None:
                    left, top, right, bottom = boxes[index, best].tolist()
                    box = (left * image.width, top * image.height, right * image.width, bottom * image.height)
                fired[name] = (best, Detection(name, probability, box))
            closer = {
                name
                for name, (best, _) in fired.items()
                for other in fired
                if other != name
                and (other in self.rivals.get(name, ()) or name in self.rivals.get(other, ()))
                and logits[other][0][index, best] > logits[name][0][index, best]
            }
            results.append({name: detection for name, (_, detection) in fired.items() if name not in closer})
        return results

    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        """Fired concepts per image, by score (descending) then name; a face names at most its nearest person."""
        objects = self._fired_objects(images) if self.object_groups else [{} for _ in images]
        results = []
        for image, fired in zip(images, objects, strict=True):
            for box, distances in self._face_distances(image) if self.face_heads else []:
                nearest = min(distances, key=lambda name: (distances[name], name))
                distance = distances[nearest]
                score = 1.0 - distance
                if distance < self.face_heads[nearest].threshold and (
                    nearest not in fired or fired[nearest].score < score
                ):
                    fired[nearest] = Detection(nearest, score, box)
            results.append(sorted(fired.values(), key=lambda detection: (-detection.score, detection.concept)))
        return results
