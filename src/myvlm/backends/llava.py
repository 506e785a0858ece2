"""LLaVA-1.5: the concept token sits right after the projected image tokens, in the LLM's input sequence.

Everything but the prompt is the shared sequence-family machinery (`myvlm.backends.sequence`): one extra image-token
slot per concept after the image's 576 (here: N) projected tokens, the L2-normalized concept vector rescaled to the
mean norm of that image's tokens, the regularizer λ·mean(p²) over the concept token's attention row summed over LLM
layers, and cached training of the frozen prefix. The prompt is the official one, not a chat template.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from myvlm.backends.base import CAPTION, VQA, instruction
from myvlm.backends.sequence import SequenceBackend


class LlavaBackend(SequenceBackend):
    family = "llava"
    model_types = ("llava",)
    model_class = LlavaForConditionalGeneration
    processor_class = LlavaProcessor
    reg_lambda = {CAPTION: 0.0075, VQA: 10.0}

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    def prompt(self, task: str, identifiers: Sequence[str] = (), question: str | None = None) -> str:
        words = instruction(task, identifiers, question)
        return f"USER: <image>\n{words} ASSISTANT:"
