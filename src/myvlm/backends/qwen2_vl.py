"""Qwen2-VL and Qwen2.5-VL: the concept token sits at the end of its image's run, right before `<|vision_end|>`.

These families see each image at its own resolution: the image processor cuts it into flattened patches plus an
`image_grid_thw` row, and the tower merges them into (h/2)·(w/2) tokens, so images of different sizes give different
token counts. The language model places tokens with 3-D M-RoPE, computed from `mm_token_type_ids`: every run of
image-typed tokens takes exactly its grid's (t, h, w) positions. A concept token is therefore one more
`<|image_pad|>` slot typed as text (0): it takes the next text position after the image's grid, `<|vision_end|>`
moves on by one, and the model's own `get_rope_index` gives the same positions in training, in cached training (where
they are computed once for the whole row and cut at the split) and at generation's prefill, which stores the
`rope_deltas` the decoding steps continue from.

The stock processors carry a torchvision video processor; without torchvision they are built image-only.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from PIL import Image
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.utils import is_torchvision_available
from transformers.vision_utils import get_vision_window_index

from myvlm.backends.base import CAPTION, VQA, Batch, instruction
from myvlm.backends.sequence import SequenceBackend
from myvlm.errors import UnusableImage

END_OF_TURN = "<|im_end|>"


@functools.cache
def image_only(processor_class: type) -> type:
    """`processor_class` without its video processor (the stock one needs torchvision): the same name, calls and
    saved files, built from the image processor, tokenizer and chat template only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(processor_class.__name__, (processor_class,), {"__init__": __init__, "__module__": __name__})


class Qwen2VLBackend(SequenceBackend):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    model_class = Qwen2VLForConditionalGeneration
    processor_class = Qwen2VLProcessor
    reg_lambda = {CAPTION: 0.0075, VQA: 10.0}

    @classmethod
    def load_processor(cls, location: str):
        if is_torchvision_available():
            return super().load_processor(location)
        return image_only(cls.processor_class).from_pretrained(location)

    def __init__(self, model: torch.nn.Module, processor) -> None:
        super().__init__(model, processor)
        # Per image size its patch grid, per prompt its chat-template text, per row its M-RoPE positions: each is
        # asked for every training step and depends only on its key.
        self._grids: dict[tuple[int, int], torch.Tensor] = {}
        self._prompts: dict[tuple, str] = {}
        self._positions: dict[tuple, torch.Tensor] = {}

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.visual

    @property
    def tower_width(self) -> int:
        return self.vision_tower.patch_embed.embed_dim

    def tower_patches(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The tower's last-layer patch features (before merging) of every image seen at one fixed square size, so
        every image gives the same number of patches, row by row as heads' region boxes read them (the processor
        flattens the patches one merge block after another)."""
        config = self.vision_tower.config
        merge = config.spatial_merge_size
        side = 8 * config.patch_size * merge
        inputs = self.pixel_inputs([image.convert("RGB").resize((side, side)) for image in images])
        grid = inputs["image_grid_thw"].to(self.device)
        states = self.vision_tower(inputs["pixel_values"].to(self.device, self.dtype), grid_thw=grid).last_hidden_state
        blocks = self.merge_block_order(states.view(-1, merge * merge, states.shape[-1]), grid)
        _, rows, columns = grid[0].tolist()
        blocks = blocks.view(len(images), rows // merge, columns // merge, merge, merge, -1)
        return blocks.permute(0, 1, 3, 2, 4, 5).reshape(len(images), rows * columns, -1)

    def merge_block_order(self, blocks: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """The tower's [merge blocks, merge², D] states in the processor's block order (Qwen2-VL keeps it)."""
        return blocks

    @property
    def answer_end_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(END_OF_TURN)

    def prompt(self, task: str, identifiers: Sequence[str] = (), question: str | None = None) -> str:
        key = (task, tuple(identifiers), question)
        if key not in self._prompts:
            self._prompts[key] = self.image_chat_prompt(instruction(task, identifiers, question))
        return self._prompts[key]

    @contextlib.contextmanager
    def refusals(self, sizes: Sequence[tuple[int, int]]) -> Iterator[None]:
        """The image processor's refusal of an image (an aspect ratio over 200:1) as one line naming its size."""
        try:
            yield
        except ValueError as error:
            named = ", ".join(dict.fromkeys(f"{width}x{height}" for width, height in sizes))
            reason = str(error).splitlines()[0]
            raise UnusableImage(f"the {self.family} image processor cannot take a {named} image: {reason}") from None

    def prompt_ids(self, prompt: str, size: tuple[int, int]) -> list[int]:
        self.grid(size)  # the image processor alone first: a size it refuses is named as such, not as a prompt error
        return super().prompt_ids(prompt, size)

    def pixel_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        with self.refusals([image.size for image in images]):
            processed = self.processor.image_processor(list(images), return_tensors="pt")
        return {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}

    def grid(self, size: tuple[int, int]) -> torch.Tensor:
        """[1, 3] (t, h, w) patch grid of an image of this size (it depends on the size only)."""
        if size not in self._grids:
            self._grids[size] = self.pixel_inputs([Image.new("RGB", size)])["image_grid_thw"]
        return self._grids[size]

    def encode(self, images, prompts, n_concepts, targets=None, with_pixels=True) -> Batch:
        """As every sequence family, plus each image's grid even without pixels: M-RoPE positions need it."""
        batch = super().encode(images, prompts, n_concepts, targets, with_pixels)
        if "image_grid_thw" not in batch.inputs:
            batch.inputs["image_grid_thw"] = torch.cat([self.grid(image.size) for image in images])
        return batch

    def token_inputs(self, ids: list[int], slots: range, prompt_length: int) -> dict[str, list[int]]:
        """Image tokens typed 1, concept tokens typed 0 (text), so M-RoPE gives each image run exactly its grid."""
        image = self.image_token_id
        types = [int(token == image) for token in ids]
        for slot in slots:
            types[slot] = 0
        return {"mm_token_type_ids": types}

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """[3, B, L] M-RoPE positions of the whole rows, as the model's forward computes them (one image per row)."""
        rows = []
        columns = ("input_ids", "mm_token_type_ids", "attention_mask", "image_grid_thw")
        for ids, types, mask, grid in zip(*(inputs[c] for c in columns), strict=True):
            key = (tuple(ids.tolist()), tuple(types.tolist()), tuple(mask.tolist()), tuple(grid.tolist()))
            if key not in self._positions:
                if len(self._positions) >= 4096:
                    self._positions.clear()
                positions, _ = self.model.model.get_rope_index(
                    ids[None], types[None], image_grid_thw=grid[None], attention_mask=mask[None]
                )
                self._positions[key] = positions
            rows.append(self._positions[key])
        return torch.cat(rows, dim=1)


class Qwen2_5_VLBackend(Qwen2VLBackend):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLProcessor

    def merge_block_order(self, blocks: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-VL's tower returns its states window by window (its window attention's order): undo that."""
        tower = self.vision_tower
        windows, _ = get_vision_window_index(grid, tower.spatial_merge_size, tower.window_size, tower.patch_size)
        return blocks[torch.argsort(windows.to(blocks.device))]
