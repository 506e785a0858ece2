"""PaliGemma and Gemma 3: the concept token joins the image's bidirectional (prefix-LM) block.

Both families let image tokens attend to each other both ways, through `token_type_ids`, so the concept token must
carry the type that puts it in that block, or it would see the image only causally and the image would never see it:
- PaliGemma: the whole prompt (image, `<bos>`, text, `\\n`) is the bidirectional prefix (type 0) and the answer the
  causal suffix (type 1), as its processor marks them when given a `suffix`. The concept sits after the image's last
  token, before `<bos>`, typed 0. The prompt is the processor's own layout (`<image>` then the instruction; it adds
  `<bos>` and the newline), there is no chat template; the answer is tokenized on its own and ends with `<eos>`.
- Gemma 3: image soft tokens are type 1 (one block per image); the concept sits after the last soft token, inside
  `<start_of_image>` ... `<end_of_image>`, typed 1. Note `processor.image_token_id` is `<start_of_image>` while the
  model's `config.image_token_id` is the soft token the features replace. Prompts come from the chat template;
  answers end with `<end_of_turn>`.
Because the concept changes every token of its block, cached training splits before the image block
(`bidirectional_image`): for PaliGemma, whose image comes first, only the vision tower's work is cached.
The vision tower is SigLIP (no CLS token), for `vision-tower:` heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
)

from myvlm.backends.base import CAPTION, VQA, instruction
from myvlm.backends.sequence import SequenceBackend


class PrefixBlockBackend(SequenceBackend):
    """What PaliGemma and Gemma 3 share: a bidirectional image block, a SigLIP tower, processors that tokenize a
    prompt which may already start with `<bos>`."""

    bidirectional_image = True
    reg_lambda = {CAPTION: 0.0075, VQA: 10.0}
    # Image processor options that keep one image one block of tokens (no extra crops).
    image_options: ClassVar[dict] = {}

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    def merged(self, output, blocks: list[torch.Tensor]):
        """The model scatters one flat run of features over all image slots: [1, Σ(N + k_b), D]."""
        return dataclasses.replace(output, pooler_output=torch.cat(blocks)[None])

    def tower_patches(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """SigLIP has no CLS token: every position of its last layer is a patch."""
        pixels = self.pixel_values(images).to(self.device, self.dtype)
        return self.vision_tower(pixel_values=pixels).last_hidden_state

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.processor.image_processor(list(images), return_tensors="pt", **self.image_options)["pixel_values"]

    def prompt_ids(self, prompt: str, size: tuple[int, int]) -> list[int]:
        """As `apply_chat_template` tokenizes: a prompt that already starts with `<bos>` gets no second one."""
        key = (prompt, size)
        if key not in self._prompt_ids:
            bos = self.tokenizer.bos_token
            encoded = self.processor(
                images=[Image.new("RGB", size)],
                text=[prompt],
                add_special_tokens=not (bos and prompt.startswith(bos)),
                return_tensors="pt",
                **self.image_options,
            )
            self._prompt_ids[key] = encoded["input_ids"][0].tolist()
        return self._prompt_ids[key]


class PaliGemmaBackend(PrefixBlockBackend):
    family = "paligemma"
    model_types = ("paligemma",)
    model_class = PaliGemmaForConditionalGeneration
    processor_class = PaliGemmaProcessor

    def token_inputs(self, ids: list[int], slots: range, prompt_length: int) -> dict[str, list[int]]:
        """Prefix (image, concepts, prompt) 0: bidirectional; answer 1: causal."""
        return {"token_type_ids": [0] * prompt_length + [1] * (len(ids) - prompt_length)}

    def prompt(self, task: str, identifiers: Sequence[str] = (), question: str | None = None) -> str:
        return f"{self.processor.image_token}{instruction(task, identifiers, question)}"

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        """The answer as the processor encodes a `suffix`: tokenized on its own, then `<eos>`."""
        return self.tokenizer(answer, add_special_tokens=False).input_ids + [self.answer_end_id]


class Gemma3Backend(PrefixBlockBackend):
    family = "gemma3"
    model_types = ("gemma3",)
    model_class = Gemma3ForConditionalGeneration
    processor_class = Gemma3Processor
    image_options = {"do_pan_and_scan": False}  # pan-and-scan crops would each be a block of their own

    def _register_hooks(self) -> None:
        super()._register_hooks()
        self._handles.append(self.model.model.register_forward_pre_hook(self._types_from_start, with_kwargs=True))

    def _types_from_start(self, module, args, kwargs):
        """Gemma 3's block mask reads token types by absolute position, so a run after a cached prefix (cached
        training) gets the prefix's types in front: all 0, as the split comes before the first image block."""
        types, cache = kwargs.get("token_type_ids"), kwargs.get("cache")
        if self.injection is None or types is None or cache is None or not cache.get_seq_length():
            return None
        kwargs["token_type_ids"] = F.pad(types, (cache.get_seq_length(), 0))
        return args, kwargs

    def token_inputs(self, ids: list[int], slots: range, prompt_length: int) -> dict[str, list[int]]:
        """Soft image tokens, the concepts among them, are 1: each image's run is one bidirectional block."""
        return {"token_type_ids": [int(token == self.image_token_id) for token in ids]}

    def prompt(self, task: str, identifiers: Sequence[str] = (), question: str | None = None) -> str:
        return self.image_chat_prompt(instruction(task, identifiers, question))

    @property
    def answer_end_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
