"""LLaVA-1.5: the concept token sits right after the projected image tokens, in the LLM's input sequence.

Each detected concept gets one extra image-token position in `input_ids`; a hook on the multimodal projector appends
the L2-normalized concept vector, rescaled to the mean norm of that image's tokens, so HF's own placeholder scatter
puts it there. The regularizer is λ·mean(p²) over the concept token's own attention row, summed over LLM layers; it
is computed from the layer inputs (queries/keys with RoPE) so fast attention kernels stay on.

Cached training: every token before the concept token is causally independent of the concept vector, so its keys
and values are computed once per image view without gradients (`cache_views`, lazily per prefix) and each step runs
only the suffix (concept token, prompt, target) on top of them (`cached_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from myvlm.backends.base import CAPTION, VQA, Backend, Batch, normalized


@dataclass
class LlavaView:
    """One image's frozen work: its projected image tokens, and the LLM's keys/values of each prefix it was seen
    with (keyed by prefix token ids and mask; training batches use one prefix per view)."""

    image_tokens: torch.Tensor  # [N, D]
    prefixes: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


class LlavaBackend(Backend):
    family = "llava"
    model_types = ("llava",)
    model_class = LlavaForConditionalGeneration
    processor_class = LlavaProcessor
    reg_lambda = {CAPTION: 0.0075, VQA: 10.0}

    @property
    def concept_width(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def _register_hooks(self) -> None:
        projector = self.model.model.multi_modal_projector
        self._handles.append(projector.register_forward_hook(self._append_concepts))
        for layer in self.model.model.language_model.layers:
            self._handles.append(layer.self_attn.register_forward_pre_hook(self._record_attention, with_kwargs=True))

    def prompt(self, task: str, identifiers: Sequence[str] = (), question: str | None = None) -> str:
        if task == CAPTION:
            instruction = (
                f"Please caption this image of {' and '.join(identifiers)}."
                if identifiers
                else ("Please caption this image.")
            )
        else:
            instruction = question
        return f"USER: <image>\n{instruction} ASSISTANT:"

    def encode(self, images, prompts, n_concepts, targets=None, with_pixels=True) -> Batch:
        rows, label_rows, prompt_lengths, positions = [], [], [], []
        image_token_id = self.image_token_id
        for index, (image, prompt, k) in enumerate(zip(images, prompts, n_concepts, strict=True)):
            prompt_ids = self.prompt_ids(prompt, image.size)
            ids = prompt_ids + (self.answer_ids(prompt, targets[index]) if targets else [])
            labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
            # k extra image-token slots right after the last image token (always in the prompt) carry the concepts.
            after_image = len(prompt_ids) - prompt_ids[::-1].index(image_token_id)
            ids = ids[:after_image] + [self.image_token_id] * k + ids[after_image:]
            labels = labels[:after_image] + [-100] * k + labels[after_image:]
            rows.append(ids)
            label_rows.append(labels)
            prompt_lengths.append(len(prompt_ids) + k)
            positions.append(list(range(after_image, after_image + k)))
        left = targets is None  # generation pads on the left, training on the right
        input_ids = self.pad(rows, self.tokenizer.pad_token_id, left)
        attention_mask = self.pad([[1] * len(r) for r in rows], 0, left)
        shifts = [input_ids.shape[1] - len(r) if left else 0 for r in rows]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_pixels:
            inputs["pixel_values"] = self.pixel_values(images)
        if targets:
            inputs["labels"] = self.pad(label_rows, -100, left)
        return Batch(inputs, prompt_lengths, [[p + s for p in pos] for pos, s in zip(positions, shifts, strict=True)])

    # --- cached training -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def cache_views(self, images: Sequence[Image.Image]) -> list[LlavaView]:
        pixels = self.pixel_values(images).to(self.device, self.dtype)
        with self.hooks_off():
            features = self.model.model.get_image_features(pixel_values=pixels).pooler_output
        return [LlavaView(tokens) for tokens in features]

    def cached_loss(self, batch: Batch, views: Sequence[LlavaView]) -> torch.Tensor:
        """Split every row before the earliest concept token; the prefixes come from the views' caches."""
        self._running(batch)
        inputs = {k: v.to(self.device) for k, v in batch.inputs.items() if k != "pixel_values"}
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        split = min(rows[0] for rows in batch.concept_positions if rows)
        prefixes = self._prefixes(ids[:, :split], mask[:, :split], views)
        layers = zip(*prefixes, strict=True)  # per layer, each sample's (key, value)
        cache = DynamicCache([tuple(torch.cat(kv) for kv in zip(*layer, strict=True)) for layer in layers])
        # Image slots after the split (the concept tokens, or image tokens of a more left-padded row) get the rest
        # of that sample's image sequence.
        rests = []
        for b, (view, vectors) in enumerate(zip(views, self.injection.vectors, strict=True)):
            n_before = int((ids[b, :split] == self.image_token_id).sum())
            rests.append(self._with_concepts(view.image_tokens, vectors)[n_before:])
        suffix = ids[:, split:]
        embeds = self.model.get_input_embeddings()(suffix)
        slots = (suffix == self.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, torch.cat(rests).to(embeds.dtype))
        output = self.model(
            inputs_embeds=embeds, attention_mask=mask, cache=cache, labels=inputs["labels"][:, split:], use_cache=True
        )
        return output.loss

    @torch.no_grad()
    def _prefixes(self, ids: torch.Tensor, mask: torch.Tensor, views: Sequence[LlavaView]) -> list[list]:
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
            with self.hooks_off():
                cache = self.model.model.language_model(
                    inputs_embeds=embeds, attention_mask=mask[rows], use_cache=True
                ).cache
            for i, b in enumerate(rows):
                views[b].prefixes[keys[b]] = [(lay.keys[i : i + 1], lay.values[i : i + 1]) for lay in cache.layers]
        return [view.prefixes[key] for view, key in zip(views, keys, strict=True)]

    # --- hooks ---------------------------------------------------------------------------------------------------
    def _append_concepts(self, module, args, image_tokens: torch.Tensor):
        """[B, N, D] projected image tokens -> [1, Σ(N+k_i), D]: HF flattens the batch before scattering anyway."""
        if self.injection is None or not self.injection.any:
            return None
        pieces = [self._with_concepts(t, v) for t, v in zip(image_tokens, self.injection.vectors, strict=True)]
        return torch.cat(pieces).unsqueeze(0)

    @staticmethod
    def _with_concepts(sample_tokens: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """[N, D] image tokens -> [N+k, D]: the concept vectors, scaled to the mean norm of the image's tokens."""
        if not len(vectors):
            return sample_tokens
        scale = sample_tokens.float().norm(dim=-1).mean()
        return torch.cat([sample_tokens, (normalized(vectors) * scale).to(sample_tokens.dtype)])

    def _record_attention(self, attention, args, kwargs):
        """Attention probabilities of each concept token's row, from the layer's own q/k projections and RoPE."""
        injection = self.injection
        if injection is None or not injection.record_attention or not injection.any:
            return None
        if injection.batch is None:
            raise RuntimeError("recording attention needs the batch: pass it to inject()/activate(), or use loss()")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        mask2d = injection.batch.inputs["attention_mask"].to(hidden.device)
        # With a cached prefix (cached_loss), `hidden` holds only the suffix and earlier keys come from the cache,
        # already rotated; batch positions stay in full-sequence coordinates.
        cache = kwargs.get("cache")
        past = cache.layers[attention.layer_idx].keys if cache is not None and cache.get_seq_length() else None
        offset = 0 if past is None else past.shape[2]
        seq_len = offset + hidden.shape[1]
        heads, kv_heads = attention.config.num_attention_heads, attention.config.num_key_value_heads
        head_dim = attention.head_dim
        terms = []
        for b, rows in enumerate(injection.batch.concept_positions):
            # RoPE tables are [1, S, d] when every sample shares positions, else [B, S, d].
            cos_b, sin_b = (cos[b : b + 1], sin[b : b + 1]) if cos.shape[0] > 1 else (cos, sin)
            for row in rows:
                r = row - offset
                q = attention.q_proj(hidden[b, r : r + 1]).view(1, 1, heads, head_dim).transpose(1, 2)
                k = attention.k_proj(hidden[b, : r + 1]).view(1, r + 1, kv_heads, head_dim).transpose(1, 2)
                q, _ = apply_rotary_pos_emb(q, q, cos_b[:, r : r + 1], sin_b[:, r : r + 1])
                _, k = apply_rotary_pos_emb(k, k, cos_b[:, : r + 1], sin_b[:, : r + 1])
                if past is not None:
                    k = torch.cat([past[b : b + 1], k], dim=2)
                k = repeat_kv(k, heads // kv_heads)
                scores = (q @ k.transpose(-1, -2)).float() * attention.scaling  # [1, H, 1, row+1]
                scores = scores.masked_fill(mask2d[b, : row + 1] == 0, float("-inf"))
                probs = scores.softmax(dim=-1)
                # Official: mean over heads and *all* key positions of the padded batch (masked ones are zeros).
                terms.append((probs**2).sum() / (heads * seq_len))
        # Summed over samples, as the official loop does (its λ values assume that).
        injection.attention_terms.append(torch.stack(terms).sum())
        return None
