"""The Ray engine: the same job as myvlm.jobs.run_job, as a Ray Data pipeline for libraries one machine cannot get
through. Photos are read by tasks, then detected and captioned by two pools of actors (`map_batches` with a callable
class: one model per actor, loaded once); the driver writes the rows as they stream back, in the photos' order, to
the same result file (so a re-run resumes), through the same labelling code as the local engine."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence

import numpy as np

from myvlm.errors import MyVLMError
from myvlm.jobs import CAPTION, JobSummary, caption_labels, detection_labels, labeled, read_photo, walk_images

# A worker is one detect actor and one caption actor sharing a CPU (the caption actor does most of the work); a
# detect-only job gives its actor the whole CPU. Reading is light and takes no CPU of its own from the workers.
DETECT_SHARE, CAPTION_SHARE = 0.25, 0.75


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise MyVLMError("--engine ray needs Ray: pip install 'myvlm[ray]'") from None
    return ray


def read_photos(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decode a batch of paths (as the local engine does: reduced, rotated RGB) into raw pixels for the actors."""
    columns = {"error": [], "pixels": [], "width": [], "height": [], "original_width": [], "original_height": []}
    for path in batch["image"]:
        image, error = read_photo(path)
        width, height = image.size if image else (0, 0)
        original = image.info["original_size"] if image else (0, 0)
        values = (error or "", image.tobytes() if image else b"", width, height, *original)
        for key, value in zip(columns, values, strict=True):
            columns[key].append(value)
    return {"image": batch["image"], **{key: np.array(values, dtype=object) for key, values in columns.items()}}


def _images(batch: dict[str, np.ndarray]) -> tuple[list[int], list]:
    """The readable photos of a batch (their row indices and PIL images, `original_size` as load_image sets it)."""
    from PIL import Image

    indices, images = [], []
    for index, error in enumerate(batch["error"]):
        if error:
            continue
        size = (int(batch["width"][index]), int(batch["height"][index]))
        image = Image.frombytes("RGB", size, batch["pixels"][index])
        image.info["original_size"] = (int(batch["original_width"][index]), int(batch["original_height"][index]))
        indices.append(index)
        images.append(image)
    return indices, images


def _use_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class DetectStage:
    """Actor: every concept head of the library (a caption job: the concepts trained for its model), loaded once."""

    def __init__(self, library: str | None, model: str | None, threads: int) -> None:
        from myvlm.jobs import build_detector
        from myvlm.library import ConceptLibrary

        _use_threads(threads)
        model_id = None
        if model is not None:
            from myvlm.model import resolve_model

            model_id = resolve_model(model)[1]
        self.detector = build_detector(ConceptLibrary(library, on_damage=lambda *_: None), model_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indices, images = _images(batch)
        labels, errors = np.full(len(batch["image"]), "", dtype=object), batch["error"].copy()
        found = labeled(lambda subset: detection_labels(self.detector, subset), images)
        _fill(batch["image"], indices, found, labels, errors)
        return batch | {"labels": labels, "error": errors}


class CaptionStage:
    """Actor: the VLM with the library's concepts, loaded once, captioning the photos with the concepts detected."""

    def __init__(self, library: str | None, model: str, load_options: dict, batch_size: int, threads: int) -> None:
        from myvlm.library import ConceptLibrary
        from myvlm.model import load

        _use_threads(threads)
        self.vlm = load(model, **load_options)
        self.vlm.use_library(ConceptLibrary(library, on_damage=lambda *_: None))
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indices, images = _images(batch)
        labels, errors = batch["labels"].copy(), batch["error"].copy()
        detected = [json.loads(labels[index]) for index in indices]

        def caption(pairs):
            return caption_labels(self.vlm, [image for image, _ in pairs], [d for _, d in pairs], self.batch_size)

        _fill(batch["image"], indices, labeled(caption, list(zip(images, detected, strict=True))), labels, errors)
        return {"image": batch["image"], "error": errors, "labels": labels}


def _fill(paths, indices: list[int], results: list, labels: np.ndarray, errors: np.ndarray) -> None:
    """Each labelled row's label, or, for a photo the model refused, its reason as the row's error (as the local
    engine writes it)."""
    for index, result in zip(indices, results, strict=True):
        if isinstance(result, str):
            errors[index] = f"{paths[index]}: {result}"
        else:
            labels[index] = json.dumps(result)


def run_ray_job(
    roots: Sequence[str],
    kind: str,
    results,
    *,
    library: str | None,
    model: str | None = None,
    load_options: dict | None = None,
    batch_size: int = 8,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
    quiet: bool = False,
    note=lambda line: None,
) -> JobSummary:
    """Label every photo under `roots` that `results` lacks on a Ray cluster (`address`; None starts a local one)."""
    from tqdm.auto import tqdm

    ray = import_ray()
    summary = JobSummary()
    pending = []
    for path in walk_images(roots):
        if str(path) in results:
            summary.skipped += 1
        else:
            pending.append(str(path))
    if not pending and not summary.skipped:
        raise MyVLMError(f"no images found in {', '.join(str(r) for r in roots)}")
    if not pending:
        results.close()
        return summary
    library = os.path.abspath(library) if library else None
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # Ray Data's own notes; failures still come back as errors
    warnings.filterwarnings("ignore", module="ray")
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR", include_dashboard=False)
    except Exception as error:  # noqa: BLE001 - Ray raises bare Exceptions (e.g. "timed out during startup")
        detail = " ".join(str(error).splitlines())[:300]
        raise MyVLMError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {detail}") from None
    complete = False
    bar = tqdm(total=len(pending), disable=True if quiet else None, unit="photo", desc="photos", file=sys.stderr)
    try:
        threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)  # per actor, on a node's share
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows in the photos' order, as the local engine writes them
        context.enable_progress_bars = False  # ours counts photos written
        blocks = max(1, min(math.ceil(len(pending) / batch_size), 64 * workers))  # enough to keep every actor busy
        dataset = ray.data.from_items([{"image": path} for path in pending], override_num_blocks=blocks)
        dataset = dataset.map_batches(read_photos, batch_size=batch_size, batch_format="numpy", num_cpus=0)
        pool = ray.data.ActorPoolStrategy(size=workers)
        detect_share = DETECT_SHARE if kind == CAPTION else 1.0
        dataset = dataset.map_batches(
            DetectStage,
            fn_constructor_kwargs={"library": library, "model": model if kind == CAPTION else None, "threads": threads},
            batch_size=batch_size,
            batch_format="numpy",
            compute=pool,
            num_cpus=detect_share,
        )
        if kind == CAPTION:
            dataset = dataset.map_batches(
                CaptionStage,
                fn_constructor_kwargs={
                    "library": library,
                    "model": model,
                    "load_options": load_options or {},
                    "batch_size": batch_size,
                    "threads": threads,
                },
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=CAPTION_SHARE,
                num_gpus=gpus_per_worker or None,
            )
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            rows = []
            for image, error, labels in zip(batch["image"], batch["error"], batch["labels"], strict=True):
                if error:
                    rows.append({"image": str(image), "error": str(error)})
                    summary.failed += 1
                    summary.first_error = summary.first_error or str(error)
                    with tqdm.external_write_mode(file=sys.stderr):
                        note(f"myvlm: skipping {error}")
                else:
                    rows.append({"image": str(image), **json.loads(labels)})
                    summary.labeled += 1
            results.write(rows)
            bar.update(len(rows))
        complete = True
    except ray.exceptions.RayError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, MyVLMError):
            raise cause from None
        raise MyVLMError(f"the Ray job failed: {' '.join(str(error).splitlines())[:300]}") from None
    finally:
        bar.close()
        results.close(complete)
        ray.shutdown()
    return summary
