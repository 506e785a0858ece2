"""PersonalizedVLM: a frozen HF VLM plus concept embeddings that enter only for images where a concept was detected."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig

from myvlm.backends import CAPTION, VQA, Backend, Batch, Injection, backend_for
from myvlm.embeddings import ActiveConcept, ConceptEmbeddings
from myvlm.errors import MyVLMError
from myvlm.hub import check_model_name, did_you_mean
from myvlm.runtime import load_plan
from myvlm.toynames import TOY_MODELS
from myvlm.vision_encoder import PREFIX as VISION_TOWER
from myvlm.vision_encoder import VisionTowerEncoder, tower_encoder_names


def resolve_model(name: str) -> tuple[str, str]:
    """(where to load from, the id concepts are stored under): toy names, local folders, or hub ids."""
    if name in TOY_MODELS:
        path = Path(str(resources.files("myvlm.toyworld"))) / "models" / name
        if not (path / "config.json").exists():
            raise MyVLMError(f"toy model '{name}' is not packaged here; rebuild it with `myvlm toyworld build`")
        return str(path), name
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MyVLMError(f"{path}: not a model folder (no config.json)")
        return str(path.resolve()), str(path.resolve())
    return name, name


@dataclass(frozen=True)
class Caption:
    text: str
    concepts: tuple[str, ...]


class PersonalizedVLM:
    """Wraps any supported HF VLM; concepts are injected through the backend's hooks, never into the weights."""

    def __init__(self, model: torch.nn.Module, processor, model_id: str) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.backend: Backend = backend_for(model.config.model_type)(model, processor)
        self.embeddings = ConceptEmbeddings(self.backend.concept_width, lambda: self.backend.device)
        self.detector = None
        # Names the model may say only for a concept active in the image: the identifiers of every library concept
        # (use_library) and, for the toy models, the toy world's names, which their pretraining captions hold.
        self.reserved_names: set[str] = set()

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
    ) -> PersonalizedVLM:
        """Load a supported VLM (README, "How the concept enters") by hub id, local folder, or a toy model name.

        `device`: auto/cpu/cuda[:i]/mps (None: where HF puts it, the CPU); `dtype`: auto/bfloat16/float16/float32
        or a torch dtype (auto: bfloat16 on CUDA, float32 for the toy models); `device_map="auto"` spreads a model
        larger than one GPU (accelerate); `load_in_4bit` / `load_in_8bit` quantize the frozen VLM with bitsandbytes
        (CUDA). Concept vectors stay float32."""
        if name in TOY_MODELS and dtype == "auto":
            dtype = torch.float32  # the toys are tiny, and their packaged results are float32 ones
        plan = load_plan(
            device=device, dtype=dtype, device_map=device_map, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit
        )
        location, model_id = resolve_model(name)
        if location == name:  # neither a toy model nor a local folder: a hub id
            check_model_name(name)
        try:
            config = AutoConfig.from_pretrained(location)
        except (OSError, ValueError) as error:
            raise MyVLMError(f"cannot load model '{name}': {str(error).splitlines()[0]}{did_you_mean(name)}") from None
        backend = backend_for(config.model_type)
        with _quiet_loading(name in TOY_MODELS):
            try:
                model = backend.model_class.from_pretrained(location, **plan.model_kwargs)
                processor = backend.load_processor(location)
            except (OSError, ValueError, AttributeError) as error:  # a folder missing weights, tokenizer, processor
                raise MyVLMError(f"cannot load model '{name}': {str(error).splitlines()[0]}") from None
        if len(processor.tokenizer) < 2:  # transformers builds an empty one where a folder lost its tokenizer files
            raise MyVLMError(f"cannot load model '{name}': its tokenizer is empty (are its tokenizer files missing?)")
        if plan.move_to is not None:
            model.to(plan.move_to)
        vlm = cls(model, processor, model_id)
        if model_id in TOY_MODELS:
            from myvlm.toyworld.world import NAMES

            vlm.reserved_names.update(NAMES)
        return vlm

    @property
    def family(self) -> str:
        return self.backend.family

    @property
    def concept_width(self) -> int:
        return self.backend.concept_width

    @property
    def concepts(self) -> ConceptEmbeddings:
        """The concepts this model can insert, by name (`vlm.concepts[name].identifier`, `.vector`)."""
        return self.embeddings

    # --- concepts -------------------------------------------------------------------------------------------------
    def add_concept(self, name: str, identifier: str, vector: torch.Tensor) -> ActiveConcept:
        return self.embeddings.add(name, identifier, vector, self.model_id)

    def learn(
        self,
        name: str,
        identifier: str,
        images: Sequence[Image.Image],
        captions: Sequence[Sequence[str]],
        config=None,
        **kwargs,
    ):
        """Learn a concept embedding from images and their captions (each mentioning `identifier`)."""
        from myvlm.training import caption_examples, learn_concept

        _check_images(images)
        if len(captions) != len(images) or any(isinstance(c, str) for c in captions):
            raise MyVLMError(f"give one list of captions per image ({len(images)} images, {len(captions)} entries)")
        return learn_concept(self, name, identifier, images, caption_examples(captions), config, **kwargs)

    def remove_concept(self, name: str) -> None:
        self.embeddings.remove(name)

    @property
    def vision_encoder(self) -> VisionTowerEncoder:
        """This model's own vision tower as an object-head encoder (`vision-tower:<model id>`)."""
        return VisionTowerEncoder(self.backend, self.model_id)

    def use_library(self, library) -> list[str]:
        """Load every library concept that has an embedding for this model, and its head for detection."""
        from myvlm.heads import ConceptDetector

        loaded, heads = [], {}
        for concept in library.concepts():
            self.reserved_names.add(concept.identifier)
            heads_entry = library.load_head(concept.name)
            if heads_entry is not None:
                heads[concept.name] = heads_entry
            if self.embeddings.load(library, concept.name, self.model_id):
                loaded.append(concept.name)
        heads = {n: h for n, h in heads.items() if n in self.concepts}
        encoders = {n: resolve_encoder(n, self) for n in tower_encoder_names(heads.values())}
        self.detector = ConceptDetector(heads, encoders) if heads else None
        return loaded

    def detect(self, images: Sequence[Image.Image]) -> list[list[str]]:
        if self.detector is None:
            return [[] for _ in images]
        return [sorted(d.concept for d in found) for found in self.detector.detect(images)]

    @contextlib.contextmanager
    def activate(
        self, per_image: Sequence[Sequence[str]], record_attention: bool = False, *, batch: Batch | None = None
    ) -> Iterator[Injection]:
        """Insert the named concepts (each once, in name order) into the images of the forward passes run inside
        (`batch`: the batch they run, which `backend.loss` and `generate` also fill in)."""
        self._check_names(per_image)
        vectors = [self.embeddings.stack(sorted(set(names))) for names in per_image]
        with self.backend.inject(vectors, batch=batch, record_attention=record_attention) as injection:
            yield injection

    def _check_names(self, per_image: Sequence[Sequence[str]]) -> None:
        """Concepts come as one list of known names per image (a bare name would be read letter by letter)."""
        for names in per_image:
            if isinstance(names, str):
                raise MyVLMError(f"give the concepts of each image as a list of names, e.g. [['{names}']]")
            unknown = [n for n in names if n not in self.embeddings]
            if unknown:
                raise MyVLMError(f"concept '{unknown[0]}' has no embedding for {self.model_id}; train it first")

    # --- generation -----------------------------------------------------------------------------------------------
    def _run(
        self,
        images: Sequence[Image.Image],
        prompts_for: callable,
        concepts: Sequence[Sequence[str]] | None,
        batch_size: int,
        max_new_tokens: int,
        progress: bool,
    ) -> list[Caption]:
        _check_images(images)
        if batch_size < 1 or max_new_tokens < 1:
            raise MyVLMError(f"batch_size and max_new_tokens must be at least 1 (got {batch_size}, {max_new_tokens})")
        if concepts is not None:
            self._check_names(concepts)
        per_image = [sorted(set(c)) for c in concepts] if concepts is not None else self.detect(images)
        if len(per_image) != len(images):
            raise MyVLMError(f"got concepts for {len(per_image)} images but {len(images)} images")
        results: list[Caption | None] = [None] * len(images)
        # Images with no concept run as their own batches: exactly the untouched model's computation.
        groups = [[i for i, c in enumerate(per_image) if not c], [i for i, c in enumerate(per_image) if c]]
        chunks = [g[s : s + batch_size] for g in groups for s in range(0, len(g), batch_size)]
        bar = _progress(len(images), progress)
        for chunk in chunks:
            names = [per_image[i] for i in chunk]
            identifiers = [[self.concepts[n].identifier for n in ns] for ns in names]
            prompts = [prompts_for(ids) for ids in identifiers]
            batch = self.backend.encode([images[i] for i in chunk], prompts, [len(n) for n in names])
            # A caption names only the concepts active in its image: never another concept, nor a name not given.
            known = self.reserved_names | set(self.embeddings.identifiers.values())
            unspoken = [sorted(known - set(ids)) for ids in identifiers]
            with self.activate(names):
                texts = self.backend.generate(batch, max_new_tokens=max_new_tokens, unspoken=unspoken)
            for i, text, ns in zip(chunk, texts, names, strict=True):
                results[i] = Caption(text, tuple(ns))
            bar.update(len(chunk))
        bar.close()
        return results

    def caption(
        self,
        images: Sequence[Image.Image],
        concepts: Sequence[Sequence[str]] | None = None,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 40,
        progress: bool = False,
    ) -> list[Caption]:
        """Caption images; `concepts` (names per image) overrides the heads' detections."""
        return self._run(
            images, lambda ids: self.backend.prompt(CAPTION, ids), concepts, batch_size, max_new_tokens, progress
        )

    def ask(
        self,
        image: Image.Image,
        question: str,
        concepts: Sequence[str] | None = None,
        *,
        max_new_tokens: int = 40,
    ) -> Caption:
        """Answer a question about one image, e.g. "What is Bobby doing?"."""
        if not question or not question.strip():
            raise MyVLMError("the question is empty")
        if token := self.backend.special_token_in(question):
            raise MyVLMError(f"the question holds the model's special token {token!r}; leave it out")
        if isinstance(concepts, str):
            raise MyVLMError(f"give the concepts as a list of names, e.g. ['{concepts}']")
        per_image = None if concepts is None else [concepts]
        prompt = self.backend.prompt(VQA, question=question.strip())
        return self._run([image], lambda ids: prompt, per_image, 1, max_new_tokens, False)[0]


def _check_images(images: Sequence[Image.Image]) -> None:
    """Images come as a sequence of non-empty PIL images (files: `myvlm.load_image`)."""
    if isinstance(images, Image.Image):
        raise MyVLMError("give a list of images, e.g. [image]")
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise MyVLMError(f"image {index} is a {type(image).__name__}, not a PIL image (open files with load_image)")
        if not image.width or not image.height:
            raise MyVLMError(f"image {index} is empty ({image.width}x{image.height} pixels)")


@contextlib.contextmanager
def _quiet_loading(quiet: bool) -> Iterator[None]:
    """No "Loading weights" bar for the toy models, which load in a blink; large models keep it."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: bars on a terminal only, so logs and pipes stay readable.
    return tqdm(total=total, disable=None if enabled and total > 1 else True, unit="img", desc="captioning")


def load(name: str, **kwargs) -> PersonalizedVLM:
    """Shorthand for PersonalizedVLM.from_pretrained."""
    return PersonalizedVLM.from_pretrained(name, **kwargs)


def resolve_encoder(name: str, loaded: PersonalizedVLM | None = None):
    """An object-head encoder name as heads take it: `vision-tower:MODEL` becomes that VLM's vision tower (`loaded`'s
    where it is that model, else the model is loaded); other names stay names, for the heads' encoder registry."""
    if not name.startswith(VISION_TOWER):
        return name
    model = name.removeprefix(VISION_TOWER)
    if loaded is not None and loaded.model_id == model:
        return loaded.vision_encoder
    return load(model).vision_encoder
