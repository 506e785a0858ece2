"""Idefics3 and SmolVLM: the image is split into crops plus a global view; one concept token per image, not per crop.

The processor writes an image as one block per crop (`<fake_token_around_image><row_i_col_j>` + N `<image>`) and a
last, global block (`<fake_token_around_image><global-img>` + N `<image>` + `<fake_token_around_image>`). The
connector's output for a sample's crops is one [crops·N, D] block (HF groups it per sample), and the concept token is
one more `<image>` slot at the end of the global block: after the image's last image token, before the closing
marker, once per image however many crops it has. Everything else is the shared sequence-family machinery.

SmolVLM's stock processor carries a video processor that needs torchvision; without torchvision it is loaded
image-only (`ImageOnlySmolVLMProcessor`), which processes images and text exactly as the stock one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import (
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available

from myvlm.backends.base import CAPTION, VQA, instruction
from myvlm.backends.sequence import SequenceBackend
from myvlm.errors import MyVLMError

END_OF_UTTERANCE = "<end_of_utterance>"


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLM's processor without its video processor (which needs torchvision): images and text as stock.

    Its sub-processors are read from `__init__`'s signature, so this one loads and checks only the image processor
    and the tokenizer; `image_seq_len` and `chat_template` stay named so `from_pretrained` passes them on."""

    def __init__(
        self, image_processor, tokenizer, image_seq_len: int = 169, chat_template: str | None = None, **kwargs
    ):
        super().__init__(image_processor, tokenizer, None, image_seq_len=image_seq_len, chat_template=chat_template)

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """The mixin's own: SmolVLM's adds frame settings read from the video processor, for videos only."""
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


class Idefics3Backend(SequenceBackend):
    family = "idefics3"
    model_types = ("idefics3",)
    model_class = Idefics3ForConditionalGeneration
    processor_class = Idefics3Processor
    reg_lambda = {CAPTION: 0.0075, VQA: 10.0}

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.text_model

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_model

    def pixel_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """[B, crops, 3, H, W] pixels and their mask; one list per sample, so each sample's crops stay its own."""
        processed = self.processor.image_processor([[image] for image in images], return_tensors="pt")
        return {key: processed[key] for key in ("pixel_values", "pixel_attention_mask")}

    def tower_patches(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The tower's patches of each whole image at its crop size (no splitting; the tower has no CLS token)."""
        processed = self.processor.image_processor(
            [[image] for image in images], do_image_splitting=False, return_tensors="pt"
        )
        pixels = processed["pixel_values"][:, 0].to(self.device, self.dtype)
        return self.vision_tower(pixel_values=pixels).last_hidden_state

    def prompt(self, task: str, identifiers: Sequence[str] = (), question: str | None = None) -> str:
        return self.image_chat_prompt(instruction(task, identifiers, question))

    @property
    def answer_end_id(self) -> int:
        """`<end_of_utterance>`, which ends every turn of the chat template (EOS for a tokenizer without it)."""
        found = self.tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
        return self.tokenizer.eos_token_id if found in (None, self.tokenizer.unk_token_id) else found


class SmolVLMBackend(Idefics3Backend):
    family = "smolvlm"
    model_types = ("smolvlm",)
    model_class = SmolVLMForConditionalGeneration
    processor_class = SmolVLMProcessor

    @classmethod
    def load_processor(cls, location: str):
        """The stock processor with torchvision; without it the image-only one (SmolVLM's also needs num2words)."""
        try:
            import num2words  # noqa: F401
        except ImportError:
            raise MyVLMError("SmolVLM's processor needs the num2words package: pip install num2words") from None
        if is_torchvision_available():
            return SmolVLMProcessor.from_pretrained(location)
        return ImageOnlySmolVLMProcessor.from_pretrained(location)
