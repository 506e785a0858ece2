"""What every VLM family shares: the per-forward state the hooks read, batching, and decoding.

A backend is a small adapter around one HF model class. It registers forward hooks at the place where the concept
token enters (the VLM weights are never modified) and says how that family's prompts look. Hooks only change anything
inside `Backend.inject(...)`, the one entry point that sets concepts for the next forward passes, so with nothing
injected the model runs its untouched code path.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from PIL import Image

from myvlm.backends.attention import RUNNING
from myvlm.errors import MyVLMError

CAPTION, VQA = "caption", "vqa"
TASKS = (CAPTION, VQA)
# model_type -> backend; every Backend subclass that declares `model_types` registers itself when its file is imported.
BACKENDS: dict[str, type[Backend]] = {}


def backend_for(model_type: str) -> type[Backend]:
    try:
        return BACKENDS[model_type]
    except KeyError:
        supported = ", ".join(sorted(BACKENDS))
        raise MyVLMError(f"model type '{model_type}' is not supported (supported: {supported})") from None


@dataclass
class Batch:
    """Model inputs plus what the hooks and decoding need to know about them."""

    inputs: dict[str, torch.Tensor]
    prompt_lengths: list[int]
    # Per sample, the sequence positions of the concept tokens (LLaVA; empty for BLIP-2).
    concept_positions: list[list[int]] = field(default_factory=list)


@dataclass
class Injection:
    """Everything one forward pass with concepts needs and leaves behind; made by `Backend.inject` only.

    Set by the caller: the concept vectors to insert, one [k_i, width] tensor per sample (k_i may be 0), whether to
    record the regularizer's attention terms, and the batch (token positions, padding mask; `loss` fills it in).
    Written by the hooks during the pass: the attention terms (one per attention layer) and the probe's index of the
    batch's concept rows. A family whose hooks pass more values on declares them in a subclass
    (`Backend.injection_class`), so none of it lives on the backend.
    """

    vectors: list[torch.Tensor]
    record_attention: bool = False
    batch: Batch | None = None
    attention_terms: list[torch.Tensor] = field(default_factory=list)
    probe_rows: object | None = None  # attention.ConceptRows of `batch`

    @property
    def any(self) -> bool:
        return any(len(v) for v in self.vectors)


class Backend:
    """Base class: subclasses declare where the concept enters and how prompts look (one file per VLM family)."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    model_class: ClassVar[type]
    processor_class: ClassVar[type]
    # λ of the attention regularizer, per task.
    reg_lambda: ClassVar[dict[str, float]]
    # Starts probed before training goes on from the best (myvlm.training): 1 where the prompt holds the identifier.
    training_starts: ClassVar[int] = 1
    # Decoder-only LMs return prompt + answer from generate(); encoder-decoders return the answer only.
    generation_includes_prompt: bool = True
    # The per-forward state this family's hooks use (a subclass of Injection where they pass values on).
    injection_class: ClassVar[type[Injection]] = Injection

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for model_type in cls.__dict__.get("model_types", ()):
            BACKENDS[model_type] = cls

    @classmethod
    def load_processor(cls, location: str):
        """The family's processor from a model folder or hub id (families override it where the stock loader needs
        more than images do, e.g. a torchvision video processor)."""
        return cls.processor_class.from_pretrained(location)

    def __init__(self, model: torch.nn.Module, processor) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if self.tokenizer.pad_token is None:  # Llama/Mistral tokenizers ship without one; batches need it
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._injection: Injection | None = None
        self._handles: list = []
        self._prompt_ids: dict[tuple[str, tuple[int, int]], list[int]] = {}
        self._answer_ids: dict[tuple[str, str], list[int]] = {}  # training asks for the same few every step
        self._register_hooks()

    # --- family specifics -------------------------------------------------------------------------------------
    @property
    def concept_width(self) -> int:
        raise NotImplementedError

    @property
    def vision_tower(self) -> torch.nn.Module:
        """The frozen vision encoder (its `last_hidden_state` is [B, 1 + patches, width]), e.g. for object heads."""
        raise NotImplementedError

    def tower_patches(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[B, patches, width] features of the vision tower's last layer, for object heads that reuse the tower: the
        patch grid's positions only, so a CLS token (CLIP) is dropped and a tower without one (SigLIP) keeps every
        patch. Families whose towers take other inputs override it."""
        pixels = self.pixel_values(images).to(self.device, self.dtype)
        vision = self.vision_tower.config
        patches = (vision.image_size // vision.patch_size) ** 2
        return self.vision_tower(pixel_values=pixels).last_hidden_state[:, -patches:]

    @property
    def tower_width(self) -> int:
        return self.vision_tower.config.hidden_size

    def _register_hooks(self) -> None:
        raise NotImplementedError

    def prompt(self, task: str, identifiers: Sequence[str] = (), question: str | None = None) -> str:
        raise NotImplementedError

    def encode(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        n_concepts: Sequence[int],
        targets: Sequence[str] | None = None,
        with_pixels: bool = True,
    ) -> Batch:
        """Model inputs (and labels, given targets); `with_pixels=False` skips image preprocessing for callers that
        bring cached image features."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------------------------
    @property
    def injection(self) -> Injection | None:
        """The state of the forward passes now running inside `inject`, or None (read-only: use `inject`)."""
        return self._injection

    @contextlib.contextmanager
    def inject(
        self, vectors: Sequence[torch.Tensor], *, batch: Batch | None = None, record_attention: bool = False
    ) -> Iterator[Injection]:
        """Insert `vectors[b]` ([k_b, width], k_b may be 0) into sample b of the forward passes run inside; the one
        way concepts enter. With `record_attention`, the hooks record the regularizer's terms (`regularizer`)."""
        if self._injection is not None:
            raise RuntimeError("concepts are already being injected; inject() does not nest")
        self._injection = self.injection_class(list(vectors), record_attention=record_attention, batch=batch)
        running = RUNNING.set(self)
        try:
            yield self._injection
        finally:
            RUNNING.reset(running)
            self._injection = None

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @functools.cached_property
    def chat_template(self) -> str | None:
        """The processor's chat template, else the tokenizer's (older folders keep it in tokenizer_config.json)."""
        return getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)

    def image_chat_prompt(self, words: str) -> str:
        """One user turn holding the image, then `words`, through the chat template, up to the assistant's answer."""
        if not self.chat_template:
            raise MyVLMError(f"the {self.family} model folder has no chat template; save its processor with one")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words}]}]
        return self.processor.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )

    @functools.cached_property
    def _special_tokens(self) -> list[str]:
        added = {token.content for token in self.tokenizer.added_tokens_decoder.values() if token.special}
        return sorted(token for token in added | set(self.tokenizer.all_special_tokens) if token)

    def special_token_in(self, text: str) -> str | None:
        """The first of the tokenizer's special tokens (image placeholders, turn markers) that `text` holds: user text
        holding one would change the prompt's structure, e.g. one image placeholder more than there are images."""
        return next((token for token in self._special_tokens if token in text), None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def prompt_ids(self, prompt: str, size: tuple[int, int]) -> list[int]:
        """The processor's token ids for a prompt with an image of this size (image tokens expanded). They do not
        depend on the pixels, so each (prompt, size) is processed once, on a blank stand-in image."""
        key = (prompt, size)
        if key not in self._prompt_ids:
            encoded = self.processor(images=[Image.new("RGB", size)], text=[prompt], return_tensors="pt")
            self._prompt_ids[key] = encoded["input_ids"][0].tolist()
        return self._prompt_ids[key]

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        """Token ids of the answer + EOS: tokenize prompt and answer together (natural spacing), keep the tail. A
        prompt ending in whitespace (a chat template's assistant turn) takes the answer as it is."""
        key = (prompt, answer)
        if key not in self._answer_ids:
            prompt_ids = self.tokenizer(prompt).input_ids
            joined = f"{prompt}{answer}" if not prompt or prompt[-1].isspace() else f"{prompt} {answer}"
            full_ids = self.tokenizer(joined).input_ids
            if full_ids[: len(prompt_ids)] != prompt_ids:
                raise MyVLMError("the tokenizer merges the prompt with the answer; end prompts with a space or colon")
            if len(self._answer_ids) >= 4096:
                self._answer_ids.clear()
            self._answer_ids[key] = full_ids[len(prompt_ids) :] + [self.answer_end_id]
        return list(self._answer_ids[key])

    @property
    def answer_end_id(self) -> int:
        """The token that ends an answer (chat families: their end-of-turn token, which generation stops on)."""
        return self.tokenizer.eos_token_id

    def pad(self, rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
        width = max(len(r) for r in rows)
        padded = [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]
        return torch.tensor(padded, dtype=torch.long)

    @torch.no_grad()
    def generate(
        self, batch: Batch, max_new_tokens: int = 40, unspoken: Sequence[Sequence[str]] | None = None
    ) -> list[str]:
        """Greedy decoding, stopping at the model's EOS or the answer end; `unspoken[i]` are words sample i may not
        say (names of concepts not in its image)."""
        self._running(batch)
        inputs = self.model_inputs(batch)
        extra = {}
        if unspoken is not None and any(unspoken):
            from transformers import LogitsProcessorList

            extra["logits_processor"] = LogitsProcessorList([UnspokenWords(self.tokenizer, unspoken)])
        stops = self.model.generation_config.eos_token_id
        stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
        if self.answer_end_id not in stops:  # stop where training taught answers to end, whatever the config says
            extra["eos_token_id"] = [*stops, self.answer_end_id]
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, **extra)
        if self.generation_includes_prompt:
            output = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The batch on the model's device, its float inputs (pixels) in the model's dtype."""
        return {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in batch.inputs.items()
        }

    def _running(self, batch: Batch) -> None:
        """Tell the active injection (if any) which batch is running, for hooks that need its positions or mask."""
        if self._injection is not None:
            self._injection.batch = batch

    def loss(self, batch: Batch) -> torch.Tensor:
        """Cross-entropy of the targets; hooks record attention terms on the way when asked to."""
        self._running(batch)
        return self.model(**self.model_inputs(batch), use_cache=False).loss

    # --- cached training (learn_concept with views_per_image) -----------------------------------------------
    def cache_views(self, images: Sequence[Image.Image]) -> list:
        """Per image, the frozen work that does not depend on the concept vector, to be reused across steps."""
        raise NotImplementedError

    def cached_loss(self, batch: Batch, views: Sequence) -> torch.Tensor:
        """`loss(batch)` with sample b's image given by `views[b]` (from `cache_views`), skipping the frozen work.
        Equal to `loss` on the same images, including the attention terms the hooks record."""
        raise NotImplementedError

    @contextlib.contextmanager
    def hooks_off(self) -> Iterator[None]:
        """Run frozen sub-computations (cached prefixes, vision states) as the untouched model, even mid-step."""
        injection, self._injection = self._injection, None
        try:
            yield
        finally:
            self._injection = injection

    def regularizer(self, task: str, reg_lambda: float | None = None) -> torch.Tensor:
        """λ · Σ_layers mean(p²) of the concept token's attention, from terms the hooks recorded this pass."""
        if self._injection is None or not self._injection.attention_terms:
            raise RuntimeError("no attention was recorded: run a forward pass with record_attention=True")
        lam = self.reg_lambda[task] if reg_lambda is None else reg_lambda
        return lam * torch.stack(self._injection.attention_terms).sum()


def instruction(task: str, identifiers: Sequence[str] = (), question: str | None = None) -> str:
    """The user's words in every family's prompt: LLaVA's caption instruction naming the identifiers, or the
    question."""
    if task != CAPTION:
        return question
    return f"Please caption this image of {' and '.join(identifiers)}." if identifiers else "Please caption this image."


def normalized(vectors: torch.Tensor) -> torch.Tensor:
    """Concept vectors are always L2-normalized before use (the official implementation does the same)."""
    return F.normalize(vectors.float(), dim=-1)


class UnspokenWords:
    """A logits processor that keeps each sample of a greedy batch from saying its own list of words: every
    tokenization of a word (with and without a leading space) is cut at its last token once its prefix is there."""

    def __init__(self, tokenizer, words_per_row: Sequence[Sequence[str]]) -> None:
        unknown = tokenizer.unk_token_id
        cache: dict[str, list[list[int]]] = {}

        def sequences(word: str) -> list[list[int]]:
            if word not in cache:
                found = {tuple(tokenizer(text, add_special_tokens=False).input_ids) for text in (word, f" {word}")}
                cache[word] = [list(ids) for ids in found if ids and unknown not in ids]
            return cache[word]

        self.rows = [[ids for word in words for ids in sequences(word)] for words in words_per_row]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, banned in enumerate(self.rows):
            history = input_ids[row].tolist()
            for ids in banned:
                prefix = ids[:-1]
                if not prefix or history[len(history) - len(prefix) :] == prefix:
                    scores[row, ids[-1]] = float("-inf")
        return scores
