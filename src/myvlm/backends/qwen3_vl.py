"""Qwen3-VL and Qwen3-VL-MoE: as Qwen2-VL (one extra `<|image_pad|>` at the end of its image's run, typed as text
for M-RoPE), plus a zero deepstack row for the concept.

Qwen3-VL's tower also returns deepstack features, one [n_i, D] block per image for each of a few tower layers, which
the language model adds to the hidden states of its first layers at the image-token positions (`visual_pos_masks`).
The concept slot is an `<|image_pad|>` token, so it is one of those positions and every deepstack block needs a row
for it. That row is zero: deepstack features are the tower's view of the image's own patches, and a concept has none,
so the concept enters at the input embedding only, as in every other family (adding zero leaves its hidden state
untouched, so no second copy of the vector is scaled in at each layer). Precomputed features get their zero rows in
`merged`; cached training gets each pass's deepstack rows (the image's own, then the zeros) from `image_pass`, since
the prefix and suffix passes feed the language model embeddings, not pixels.

M-RoPE is interleaved in Qwen3-VL (t, h, w frequencies alternate) but computed from the same `mm_token_type_ids` and
grid by `get_rope_index`, so the concept's positions and generation's `rope_deltas` work as in Qwen2-VL.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor

from myvlm.backends.base import Batch
from myvlm.backends.qwen2_vl import Qwen2VLBackend
from myvlm.backends.sequence import SequenceView


@dataclass
class DeepstackView(SequenceView):
    """A cached image view with its deepstack features: one [N, D] block per deepstack layer."""

    deepstack: list[torch.Tensor] = field(default_factory=list)


def with_zero_rows(block: torch.Tensor, length: int) -> torch.Tensor:
    """[n, D] deepstack rows of an image -> [length, D]: zero rows for its concept slots."""
    return torch.cat([block, block.new_zeros(length - len(block), block.shape[-1])])


class Qwen3VLBackend(Qwen2VLBackend):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    model_class = Qwen3VLForConditionalGeneration
    processor_class = Qwen3VLProcessor

    def merged(self, output, blocks: list[torch.Tensor]):
        """The encoder output with these blocks (concepts appended) and each deepstack block padded with a zero row
        per concept, in a new output (the caller's stays as it was)."""
        deepstack = [
            [with_zero_rows(layer_block, len(block)) for layer_block, block in zip(layer, blocks, strict=True)]
            for layer in output.deepstack_features
        ]
        return dataclasses.replace(output, pooler_output=blocks, deepstack_features=deepstack)

    def cache_views(self, images) -> list[DeepstackView]:
        """Per image its merged tokens and its deepstack blocks, which cached training's passes need too."""
        output = self.image_features(self.model_inputs(Batch(self.pixel_inputs(images), [])))
        return [
            DeepstackView(tokens, deepstack=[layer[i] for layer in output.deepstack_features])
            for i, tokens in enumerate(self.split_images(output))
        ]

    @contextlib.contextmanager
    def image_pass(self, ids: torch.Tensor, views: Sequence[DeepstackView], starts: Sequence[int]):
        """The language model gets this pass's deepstack rows at its image slots: row i's slots continue view i's
        rows (then its concepts' zero rows) from starts[i] on, as the input embeddings do."""
        mask = ids == self.image_token_id
        counts = mask.sum(dim=1).tolist()
        deepstack = []
        for layer in range(len(views[0].deepstack)):
            rows = []
            for view, start, count in zip(views, starts, counts, strict=True):
                block = view.deepstack[layer]
                rows.append(with_zero_rows(block, max(len(block), start + count))[start : start + count])
            deepstack.append(torch.cat(rows))

        def add_deepstack(module, args, kwargs):
            return args, {**kwargs, "visual_pos_masks": mask, "deepstack_visual_embeds": deepstack}

        handle = self.language_model.register_forward_pre_hook(add_deepstack, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


class Qwen3VLMoeBackend(Qwen3VLBackend):
    """Qwen3-VL with mixture-of-experts MLPs in its language model: the same inputs, attention and deepstack."""

    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    model_class = Qwen3VLMoeForConditionalGeneration
