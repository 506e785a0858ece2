"""BLIP-2 (OPT or Flan-T5): the concept token is an extra output token of the vision encoder.

The Q-Former's 32 queries then cross-attend to 257+k tokens. As in the official implementation, the concept vector
is L2-normalized and passes the encoder's final LayerNorm, and in every cross-attention layer the key/value of each
concept token are rescaled to the mean norm of that image's keys/values, so the new token neither dominates nor
vanishes. Samples of one batch may carry different numbers of concepts: the unused slots are masked out of the
cross-attention. The regularizer is λ·mean(p²) over the queries' attention to the concept tokens, summed over
cross-attention layers.

Cached training: the vision encoder is frozen and runs before the concept enters, so its outputs are computed once
per image view (`cache_views`) and each step runs only the Q-Former and the LLM (`cached_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

from myvlm.backends.base import CAPTION, VQA, Backend, Batch, Injection, normalized


@dataclass
class Blip2Injection(Injection):
    """BLIP-2's per-forward state: what the vision hook passes on to the Q-Former's hooks."""

    n_image: int = 0  # vision tokens before the concept slots
    slot_mask: torch.Tensor | None = None  # [B, k_max], 1 for a used slot
    queries: torch.Tensor | None = None  # the current cross-attention layer's queries (while recording attention)


class Blip2Backend(Backend):
    family = "blip2"
    model_types = ("blip-2",)
    model_class = Blip2ForConditionalGeneration
    processor_class = Blip2Processor
    injection_class = Blip2Injection
    reg_lambda = {CAPTION: 0.04, VQA: 0.04}
    # The name comes from the vector alone (the prompt is empty), so a start that lands on a plateau stays there.
    training_starts = 3

    def __init__(self, model, processor) -> None:
        self.generation_includes_prompt = model.config.use_decoder_only_language_model
        super().__init__(model, processor)

    @property
    def concept_width(self) -> int:
        return self.model.config.vision_config.hidden_size

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.vision_model

    def _register_hooks(self) -> None:
        self._handles.append(self.model.vision_model.register_forward_hook(self._append_concepts))
        self._handles.append(self.model.qformer.register_forward_pre_hook(self._mask_unused_slots, with_kwargs=True))
        for layer in self.model.qformer.encoder.layer:
            if not getattr(layer, "has_cross_attention", False):
                continue
            attention = layer.crossattention.attention
            self._handles.append(attention.key.register_forward_hook(self._rescale_keys))
            self._handles.append(attention.value.register_forward_hook(self._rescale))
            self._handles.append(attention.query.register_forward_hook(self._keep_queries))

    def prompt(self, task: str, identifiers=(), question: str | None = None) -> str:
        # Identifiers never enter the prompt: BLIP-2 captions from the empty prompt, as in the official code.
        return "" if task == CAPTION else f"Question: {question} Answer:"

    def encode(self, images, prompts, n_concepts, targets=None, with_pixels=True) -> Batch:
        rows, label_rows, prompt_lengths = [], [], []
        decoder_only = self.generation_includes_prompt
        for index, prompt in enumerate(prompts):
            prompt_ids = self.prompt_ids(prompt, images[index].size)
            ids, labels = prompt_ids, None
            if targets and decoder_only:
                answer = self.answer_ids(prompt, targets[index])
                ids = prompt_ids + answer
                labels = [-100] * len(prompt_ids) + answer
            elif targets:
                labels = self.tokenizer(targets[index]).input_ids
                if labels[-1] != self.tokenizer.eos_token_id:
                    labels.append(self.tokenizer.eos_token_id)
            rows.append(ids)
            label_rows.append(labels)
            prompt_lengths.append(len(prompt_ids))
        left = targets is None or not decoder_only
        inputs = {
            "input_ids": self.pad(rows, self.tokenizer.pad_token_id, left),
            "attention_mask": self.pad([[1] * len(r) for r in rows], 0, left),
        }
        if with_pixels:
            inputs["pixel_values"] = self.pixel_values(images)
        if targets:
            inputs["labels"] = self.pad(label_rows, -100, left=False)
        return Batch(inputs, prompt_lengths, [[] for _ in rows])

    # --- cached training -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def cache_views(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """The vision encoder's output per image, [257, W]."""
        pixels = self.pixel_values(images).to(self.device, self.dtype)
        with self.hooks_off():
            return list(self.model.vision_model(pixel_values=pixels).last_hidden_state)

    def image_features(self, vision_states: torch.Tensor):
        """HF's image-feature path (Q-Former, projection) from vision-encoder states [B, 257, W], with the injected
        concepts appended as the vision hook appends them: (features in the LM's width, the Q-Former's output)."""
        vision = BaseModelOutputWithPooling(last_hidden_state=vision_states)
        states = (self._append_concepts(self.model.vision_model, (), vision) or vision).last_hidden_state
        qformer = self.model.qformer(
            query_embeds=self.model.query_tokens.expand(states.shape[0], -1, -1),
            encoder_hidden_states=states,
            encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long, device=states.device),
            return_dict=True,
        )
        return self.model.language_projection(qformer.last_hidden_state.to(states.dtype)), qformer

    def cached_loss(self, batch: Batch, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """`loss` from cached vision states: the Q-Former and the LM run through the same hooks."""
        self._running(batch)
        features, qformer = self.image_features(torch.stack(list(views)))
        image = BaseModelOutputWithVisionQformerOutputs(pooler_output=features, qformer_outputs=qformer)
        inputs = {k: v.to(self.device) for k, v in batch.inputs.items() if k != "pixel_values"}
        if self.generation_includes_prompt:
            # Logits only from the position before the first target on: the LM head skips the query and prompt
            # positions, whose predictions the loss ignores anyway (same loss, less work).
            labels = inputs["labels"]
            keep = labels.shape[1] - int((labels != -100).any(0).nonzero()[0]) + 1
            inputs["labels"], inputs["logits_to_keep"] = labels[:, -keep:], keep
        return self.model(pixel_values=None, mm_encoder_outputs={"image": image}, **inputs, use_cache=False).loss

    # --- hooks ---------------------------------------------------------------------------------------------------
    def _append_concepts(self, module, args, output):
        """Vision encoder output [B, 257, W] -> [B, 257+k_max, W]; unused slots are zeros, masked in the Q-Former."""
        injection = self.injection
        if injection is None or not injection.any:
            return None
        hidden = output.last_hidden_state
        k_max = max(len(v) for v in injection.vectors)
        slots = hidden.new_zeros(hidden.shape[0], k_max, hidden.shape[2])
        # As in the official code, the concept enters before the encoder's final LayerNorm (it is inserted at the
        # last layer's output), so it arrives at the scale of the image tokens.
        post_layernorm = self.model.vision_model.post_layernorm
        for b, vectors in enumerate(injection.vectors):
            if len(vectors):
                slots[b, : len(vectors)] = post_layernorm(normalized(vectors).to(hidden.dtype))
        output.last_hidden_state = torch.cat([hidden, slots], dim=1)
        injection.n_image = hidden.shape[1]
        injection.slot_mask = torch.tensor(
            [[1] * len(v) + [0] * (k_max - len(v)) for v in injection.vectors], device=hidden.device
        )
        return output

    def _mask_unused_slots(self, module, args, kwargs):
        injection = self.injection
        if injection is None or not injection.any:
            return None
        image_mask = kwargs["encoder_attention_mask"][:, : injection.n_image]
        kwargs["encoder_attention_mask"] = torch.cat([image_mask, injection.slot_mask], dim=1)
        return args, kwargs

    def _rescale(self, module, args, projected: torch.Tensor):
        """Rescale each concept token's key/value to the mean norm of its image's image-token keys/values."""
        injection = self.injection
        if injection is None or not injection.any:
            return None
        n = injection.n_image
        image_part, concept_part = projected[:, :n], projected[:, n:]
        target = image_part.norm(dim=-1, keepdim=True).mean(dim=1, keepdim=True)
        rescaled = concept_part / concept_part.norm(dim=-1, keepdim=True).clamp_min(1e-12) * target
        return torch.cat([image_part, rescaled], dim=1)

    def _keep_queries(self, module, args, queries: torch.Tensor):
        injection = self.injection
        if injection is not None and injection.record_attention and injection.any:
            injection.queries = queries
        return None

    def _rescale_keys(self, module, args, projected: torch.Tensor):
        keys = self._rescale(module, args, projected)
        injection = self.injection
        if keys is not None and injection.record_attention:
            injection.attention_terms.append(self._concept_attention_term(injection, keys))
        return keys

    def _concept_attention_term(self, injection: Blip2Injection, keys: torch.Tensor) -> torch.Tensor:
        """mean(p²) of the queries' cross-attention to the (used) concept slots, recomputed from q and k."""
        queries, slot_mask, n_image = injection.queries, injection.slot_mask, injection.n_image
        heads = self.model.config.qformer_config.num_attention_heads
        head_dim = queries.shape[-1] // heads
        q = queries.view(queries.shape[0], -1, heads, head_dim).transpose(1, 2).float()
        k = keys.view(keys.shape[0], -1, heads, head_dim).transpose(1, 2).float()
        scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5  # [B, H, Q, 257+k_max]
        key_mask = torch.cat([slot_mask.new_ones(keys.shape[0], n_image), slot_mask], dim=1)
        scores = scores.masked_fill(key_mask[:, None, None, :] == 0, float("-inf"))
        concept_probs = scores.softmax(dim=-1)[..., n_image:]  # [B, H, Q, k_max]
        used = slot_mask[:, None, None, :].expand_as(concept_probs).bool()
        return (concept_probs[used] ** 2).mean()
