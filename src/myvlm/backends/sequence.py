"""What families share whose concept token enters the language model's input sequence (LLaVA, Qwen2-VL, ...).

A concept takes one extra image-placeholder token right after its image's last image token (inside the image's run,
before any end-of-image marker). While concepts are injected, the image features are computed once under no hooks,
each concept vector (L2-normalized, scaled to the mean norm of its image's tokens) is appended to its image's tokens,
and the model gets them precomputed (`mm_encoder_outputs`), so HF's own placeholder scatter puts each where its slot
is (a forward pre-hook on the multimodal model does this, for any forward or generate run inside `inject`). With
nothing injected the model gets its pixels and runs its untouched path. The regularizer's attention comes
from the generic probe (`myvlm.backends.attention`).

A family says, by overriding the hooks below: how images become pixel inputs (`pixel_inputs`), how the image
encoder's output splits into one [n_i, width] block per image and back (`split_images`, `merged`), which per-token
inputs its slots need (`token_inputs`, e.g. M-RoPE or prefix-LM token types), positions for a split sequence
(`position_ids`), image features its language model takes besides the input embeddings (`image_pass`, cached
training), its prompts, and its vision tower.

Cached training: every token before the earliest concept token is causally independent of the concept vector, so its
keys and values are computed once per image view without gradients and each step runs only the suffix. Families whose
image block attends bidirectionally (`bidirectional_image = True`) split before the image block instead. Within a
pass, only what is read is computed where that is cheap to know: the logits of the positions whose next token is a
target, and each decoder layer's feed-forward block (`feed_forward_blocks`) on the positions a later layer, the
logits or the regularizer read (the prefix pass keeps keys and values only, so its last block reads none).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from PIL import Image
from transformers import DynamicCache

from myvlm.backends.attention import AttentionProbe
from myvlm.backends.base import Backend, Batch, normalized


@dataclass
class SequenceView:
    """One image's frozen work: its image tokens, their mean norm (the concepts' scale), and the language model's
    keys/values of each prefix it was seen with (keyed by prefix token ids and mask; training batches use one prefix
    per view)."""

    image_tokens: torch.Tensor  # [N, D]
    prefixes: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    scale: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.scale = mean_norm(self.image_tokens)


class SequenceBackend(Backend):
    """Base of the families whose concept is an extra token of the language model's input sequence."""

    # The image block attends both ways (prefix-LM): the concept changes every image token, not only later ones.
    bidirectional_image: ClassVar[bool] = False

    # --- family specifics (defaults fit LLaVA-1.5's layout) -----------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def concept_width(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def probe_config(self):
        """The config object the language model's attention layers hold (the probe wraps their implementation)."""
        return self.language_model.config

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def pixel_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """The image processor's inputs for these images (one image per sample)."""
        return {"pixel_values": self.pixel_values(images)}

    def split_images(self, output) -> list[torch.Tensor]:
        """The image encoder's output (`get_image_features`) as one [n_i, width] block per image."""
        return list(output.pooler_output)

    def merged(self, output, blocks: list[torch.Tensor]):
        """The encoder output carrying these per-image blocks instead, in the form the model's forward takes."""
        output.pooler_output = blocks
        return output

    def token_inputs(self, ids: list[int], slots: range, prompt_length: int) -> dict[str, list[int]]:
        """Per-token inputs besides ids and mask for one row (`slots`: its concept tokens); padded with 0."""
        return {}

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Explicit positions, for families whose positions are not 0..L-1 (M-RoPE); None: the model's default."""
        return None

    def slot_index(self, prompt_ids: list[int]) -> int:
        """Where a row's concept tokens go: right after its image's last image token."""
        return len(prompt_ids) - prompt_ids[::-1].index(self.image_token_id)

    def image_pass(self, ids: torch.Tensor, views: Sequence[SequenceView], starts: Sequence[int]):
        """Context of one cached-training pass over `ids`, whose row i's image slots take views[i]'s image tokens
        (concepts appended) from starts[i] on. Families whose language model takes image features beyond the input
        embeddings (Qwen3-VL's deepstack) hand them over here; the input embeddings are filled in already."""
        return contextlib.nullcontext()

    # --- shared -------------------------------------------------------------------------------------------------
    def _register_hooks(self) -> None:
        self._probe = AttentionProbe(self.probe_config)
        self._handles.append(self._probe)
        self._handles.append(self.model.model.register_forward_pre_hook(self._insert_concepts, with_kwargs=True))

    def encode(self, images, prompts, n_concepts, targets=None, with_pixels=True) -> Batch:
        rows, label_rows, token_rows, prompt_lengths, positions = [], [], [], [], []
        for index, (image, prompt, k) in enumerate(zip(images, prompts, n_concepts, strict=True)):
            prompt_ids = self.prompt_ids(prompt, image.size)
            ids = prompt_ids + (self.answer_ids(prompt, targets[index]) if targets else [])
            labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
            slot = self.slot_index(prompt_ids)
            ids = ids[:slot] + [self.image_token_id] * k + ids[slot:]
            labels = labels[:slot] + [-100] * k + labels[slot:]
            rows.append(ids)
            label_rows.append(labels)
            prompt_lengths.append(len(prompt_ids) + k)
            positions.append(range(slot, slot + k))
            token_rows.append(self.token_inputs(ids, positions[-1], prompt_lengths[-1]))
        left = targets is None  # generation pads on the left, training on the right
        input_ids = self.pad(rows, self.tokenizer.pad_token_id, left)
        shifts = [input_ids.shape[1] - len(r) if left else 0 for r in rows]
        inputs = {"input_ids": input_ids, "attention_mask": self.pad([[1] * len(r) for r in rows], 0, left)}
        for key in token_rows[0]:
            inputs[key] = self.pad([row[key] for row in token_rows], 0, left)
        if with_pixels:
            inputs.update(self.pixel_inputs(images))
        if targets:
            inputs["labels"] = self.pad(label_rows, -100, left)
        return Batch(inputs, prompt_lengths, [[p + s for p in pos] for pos, s in zip(positions, shifts, strict=True)])

    def image_features(self, inputs: dict[str, torch.Tensor]):
        """`get_image_features` on the pixel inputs it takes, as the untouched model (no probe, no concepts)."""
        encoder = self.model.model.get_image_features
        wanted = inspect.signature(encoder).parameters
        with torch.no_grad(), self.hooks_off():
            return encoder(**{k: v for k, v in inputs.items() if k in wanted and v is not None}, return_dict=True)

    def _insert_concepts(self, module, args, kwargs):
        """Forward pre-hook on the multimodal model: pass the image features precomputed, concepts appended (a forward
        with pixels encodes them here; generate's prefill brings the ones it encoded)."""
        injection = self.injection
        if injection is None or not injection.any:
            return None
        if injection.record_attention:
            self._probe.install()  # again, in case the attention implementation was changed since
        output = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if output is None:
            if kwargs.get("pixel_values") is None:
                return None  # a decoding step: the concept tokens are in the cache already
            output = self.image_features(kwargs)
        blocks = [self.with_concepts(t, v) for t, v in zip(self.split_images(output), injection.vectors, strict=True)]
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("pixel_values")}
        kwargs["mm_encoder_outputs"] = {"image": self.merged(output, blocks)}
        return args, kwargs

    @staticmethod
    def with_concepts(image_tokens: torch.Tensor, vectors: torch.Tensor, scale: torch.Tensor | None = None):
        """[N, D] image tokens -> [N+k, D]: the concept vectors, scaled to the mean norm of the image's tokens
        (`scale` where known already: `image_tokens` may then be a tail of them)."""
        if not len(vectors):
            return image_tokens
        scale = mean_norm(image_tokens) if scale is None else scale
        return torch.cat([image_tokens, (normalized(vectors) * scale).to(image_tokens.dtype)])

    # --- cached training -------------------------------------------------------------------------------------------
    def cache_views(self, images: Sequence[Image.Image]) -> list[SequenceView]:
        inputs = {k: v.to(self.device) for k, v in self.pixel_inputs(images).items()}
        inputs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        return [SequenceView(tokens) for tokens in self.split_images(self.image_features(inputs))]

    def cached_loss(self, batch: Batch, views: Sequence[SequenceView]) -> torch.Tensor:
        """Split every row before the earliest concept token (or image block); prefixes come from the views' caches."""
        self._running(batch)
        inputs = {k: v.to(self.device) for k, v in batch.inputs.items() if not k.startswith("pixel_values")}
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        image = ids == self.image_token_id
        if self.bidirectional_image:
            split = min(int(row.nonzero()[0]) for row in image)
        else:
            split = min(rows[0] for rows in batch.concept_positions if rows)
        positions = self.position_ids(inputs)
        cache = None
        if split:
            prefixes = self._prefixes(ids[:, :split], mask[:, :split], views, _cut(positions, 0, split))
            layers = zip(*prefixes, strict=True)  # per layer, each sample's (key, value)
            cache = DynamicCache([tuple(torch.cat(kv) for kv in zip(*layer, strict=True)) for layer in layers])
        # Image slots after the split get the rest of that sample's image tokens (with its concepts).
        starts = image[:, :split].sum(dim=1).tolist()
        rests = []
        for view, vectors, start in zip(views, self.injection.vectors, starts, strict=True):
            rests.append(self.with_concepts(view.image_tokens[start:], vectors, view.scale))
        suffix = ids[:, split:]
        embeds = self.model.get_input_embeddings()(suffix)
        slots = (suffix == self.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, torch.cat(rests).to(embeds.dtype))
        extra = {k: v[:, split:] for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "labels")}
        # Logits only at the positions whose next token is a target, in one [n, vocabulary] block.
        labels = inputs["labels"][:, split:]
        predicting = torch.zeros_like(labels, dtype=torch.bool)
        predicting[:, :-1] = labels[:, 1:] != -100
        concepts = [[row - split for row in rows] for rows in batch.concept_positions]
        read = _read_rows(predicting, concepts, len(self.feed_forward_blocks))
        with self.image_pass(suffix, views, starts), self._feed_forward_rows(read):
            output = self.model(
                inputs_embeds=embeds,
                attention_mask=mask,
                cache=cache,
                position_ids=_cut(positions, split, None),
                logits_to_keep=predicting,
                use_cache=cache is not None,
                **{k: v for k, v in extra.items() if v.dim() == 2 and v.shape[1] == suffix.shape[1]},
            )
        vocabulary = self.model.config.get_text_config().vocab_size
        targets = labels[:, 1:][predicting[:, :-1]]
        return self.model.loss_function(logits=output.logits, labels=None, vocab_size=vocabulary, shift_labels=targets)

    @property
    def feed_forward_blocks(self) -> list[torch.nn.Module]:
        """Each decoder layer's feed-forward block (`mlp`: position-wise, dense or mixture-of-experts), in order; none
        where a layer has no such block."""
        blocks = [getattr(layer, "mlp", None) for layer in getattr(self.language_model, "layers", ())]
        return blocks if all(isinstance(block, torch.nn.Module) for block in blocks) else []

    @contextlib.contextmanager
    def _feed_forward_rows(self, kept: Sequence[torch.Tensor | None]):
        """Each decoder layer's feed-forward block computes only its `kept` positions ([B, L] bool; None: all) and
        gives the others zeros. The block is position-wise, so the kept positions' outputs are what they would be;
        for cached training, whose short passes spend most of their time there, on rows no later step reads."""
        handles, indices = [], {}
        for block, rows in zip(self.feed_forward_blocks, kept, strict=True):
            if rows is None:
                continue
            if id(rows) not in indices:  # layers sharing their positions share the index
                indices[id(rows)] = rows.flatten().nonzero().squeeze(1)  # rows of the flattened [B * L, D] states
            index = indices[id(rows)]

            def gather(module, args, index=index):
                if not args or not torch.is_tensor(args[0]) or args[0].dim() != 3:  # a call this cannot narrow
                    return None
                return (args[0].flatten(0, 1).index_select(0, index)[None], *args[1:])

            def scatter(module, args, output, rows=rows, index=index):
                hidden = output[0] if isinstance(output, tuple) else output
                if not args or not torch.is_tensor(args[0]) or args[0].shape[:2] != (1, len(index)):
                    return None
                full = hidden.new_zeros(rows.numel(), hidden.shape[-1]).index_copy(0, index, hidden[0])
                full = full.view(*rows.shape, -1)
                return (full, *output[1:]) if isinstance(output, tuple) else full

            handles += [block.register_forward_pre_hook(gather), block.register_forward_hook(scatter)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def _prefixes(self, ids, mask, views: Sequence[SequenceView], positions) -> list[list]:
        """Per sample, per layer, the (key, value) of its prefix [1, kv_heads, P, d]; missing ones in one pass."""
        keys = [(tuple(i.tolist()), tuple(m.tolist())) for i, m in zip(ids, mask, strict=True)]
        missing = {}
        for b, (view, key) in enumerate(zip(views, keys, strict=True)):
            if key not in view.prefixes:
                missing.setdefault((id(view), key), b)
        if missing:
            rows = list(missing.values())
            embeds = self.model.get_input_embeddings()(ids[rows])
            slots = (ids[rows] == self.image_token_id).unsqueeze(-1)
            image_rows = [views[b].image_tokens[: int(slots[i].sum())] for i, b in enumerate(rows)]
            embeds = embeds.masked_scatter(slots, torch.cat(image_rows).to(embeds.dtype))
            # Only keys and values are kept: the last layer's feed-forward block runs on no position.
            depth = len(self.feed_forward_blocks)
            unread = [None] * (depth - 1) + [torch.zeros_like(ids[rows], dtype=torch.bool)] if depth else []
            with (
                self.hooks_off(),
                self.image_pass(ids[rows], [views[b] for b in rows], [0] * len(rows)),
                self._feed_forward_rows(unread),
            ):
                cache = self.language_model(
                    inputs_embeds=embeds,
                    attention_mask=mask[rows],
                    position_ids=None if positions is None else positions[..., rows, :],
                    cache=DynamicCache(),  # every key kept: a sliding-window layer's own cache drops old ones
                    use_cache=True,
                ).cache
            for i, b in enumerate(rows):
                views[b].prefixes[keys[b]] = [(lay.keys[i : i + 1], lay.values[i : i + 1]) for lay in cache.layers]
        return [view.prefixes[key] for view, key in zip(views, keys, strict=True)]


def mean_norm(tokens: torch.Tensor) -> torch.Tensor:
    """The mean L2 norm of [N, D] tokens (in float32): the scale the concept vectors of their image take."""
    return tokens.float().norm(dim=-1).mean()


def _read_rows(predicting: torch.Tensor, concepts: list[list[int]], depth: int) -> list[torch.Tensor]:
    """Per layer of a cached step's suffix pass ([B, L] positions whose logits meet a label, each row's concept
    positions), the positions whose feed-forward output is read: in the last layer the predicting ones; in earlier
    ones every position up to a row's last predicting position or concept token (the regularizer reads the concept
    rows' queries in every layer), since later positions (padding, a row's final token) feed only later ones."""
    if not depth:
        return []
    read = predicting.clone()
    for row, positions in enumerate(concepts):
        read[row, positions] = True
    reach = read.flip(-1).cummax(dim=-1).values.flip(-1)  # at or before the row's last read position
    return [reach] * (depth - 1) + [predicting]


def _cut(positions: torch.Tensor | None, start: int, stop: int | None) -> torch.Tensor | None:
    """Positions [..., B, L] restricted to sequence columns start:stop."""
    return None if positions is None else positions[..., start:stop]
