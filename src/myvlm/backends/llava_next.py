"""LLaVA-NeXT and LLaVA-OneVision: the concept token follows each image's anyres-packed tokens.

An image becomes a base view plus the tiles of its best `image_grid_pinpoints` resolution; the model packs their
tokens (base view, then the unpadded tile grid with an `image_newline` row end) into one block per image, whose length
depends on the image's aspect ratio. `get_image_features` returns those packed blocks, so the shared sequence
machinery appends each concept once per image, after packing (a hook on the projector would see every tile). Prompts
come from the processor's chat template where the folder has one (LLaVA-1.5's prompt otherwise), and answers end
with the template's end-of-turn token.

LLaVA-OneVision's stock processor needs its video processor, which needs torchvision; without torchvision it is
loaded image-only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import cached_property

import torch
from PIL import Image
from transformers import (
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
)

from myvlm.backends.base import CAPTION, VQA, instruction
from myvlm.backends.sequence import SequenceBackend


class LlavaNextBackend(SequenceBackend):
    family = "llava_next"
    model_types = ("llava_next",)
    model_class = LlavaNextForConditionalGeneration
    processor_class = LlavaNextProcessor
    reg_lambda = {CAPTION: 0.0075, VQA: 10.0}

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    def pixel_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Tiles [B, max_tiles, 3, H, W] (padded; the model reads each image's count from its size) and sizes."""
        processed = self.processor.image_processor(list(images), return_tensors="pt")
        return {"pixel_values": processed["pixel_values"], "image_sizes": processed["image_sizes"]}

    def tower_patches(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The tower's last layer on each image's base view (the whole image at the tower's size), CLS dropped."""
        pixels = self.pixel_values(images)[:, 0].to(self.device, self.dtype)
        vision = self.vision_tower.config
        patches = (vision.image_size // vision.patch_size) ** 2
        return self.vision_tower(pixel_values=pixels).last_hidden_state[:, -patches:]

    def prompt(self, task: str, identifiers: Sequence[str] = (), question: str | None = None) -> str:
        words = instruction(task, identifiers, question)
        if not self.chat_template:
            return f"USER: <image>\n{words} ASSISTANT:"
        return self._chat([self._message("user", words, image=True)], add_generation_prompt=True)

    @cached_property
    def answer_end_id(self) -> int:
        """The chat template's end of an assistant turn: the first special token it writes after the answer."""
        if not self.chat_template:
            return self.tokenizer.eos_token_id
        user = self._message("user", "a")
        prompt = self._chat([user], add_generation_prompt=True)
        full = self._chat([user, self._message("assistant", "a")])
        tail = full[len(prompt) :] if full.startswith(prompt) else full
        special = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id, self.tokenizer.pad_token_id}
        ends = [i for i in self.tokenizer(tail, add_special_tokens=False).input_ids if i in special]
        return ends[0] if ends else self.tokenizer.eos_token_id

    @cached_property
    def _plain_content(self) -> bool:
        """Whether the chat template takes a message's content as plain text rather than HF's list of parts."""
        return self.processor.image_token not in self._chat([self._message("user", "a", image=True, plain=False)])

    def _message(self, role: str, text: str, image: bool = False, plain: bool | None = None) -> dict:
        if self._plain_content if plain is None else plain:
            return {"role": role, "content": f"{self.processor.image_token}\n{text}" if image else text}
        return {"role": role, "content": [{"type": "image"}] * image + [{"type": "text", "text": text}]}

    def _chat(self, conversation: list[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(
            conversation, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
        )


class LlavaOnevisionBackend(LlavaNextBackend):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    model_class = LlavaOnevisionForConditionalGeneration
    processor_class = LlavaOnevisionProcessor

    @classmethod
    def load_processor(cls, location: str):
        """The stock processor with torchvision; without it, the same processor minus its video processor."""
        if importlib.util.find_spec("torchvision") is not None:
            return cls.processor_class.from_pretrained(location)
        return ImageOnlyOnevisionProcessor.from_pretrained(location)


class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor without a video processor (the stock one needs torchvision to be built)."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        kwargs.pop("video_processor", None)
        super().__init__(
            image_processor,
            tokenizer,
            None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )
