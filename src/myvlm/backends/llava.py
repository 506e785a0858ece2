"""LLaVA-1.5: the concept token sits right after the projected image tokens, in the LLM's input sequence.

Each detected concept gets one extra image-token position in `input_ids`; a hook on the multimodal projector appends
the L2-normalized concept vector, rescaled to the mean norm of that image's tokens, so HF's own placeholder scatter
puts it there. The regularizer is λ·mean(p²) over the concept token's own attention row, summed over LLM layers; it
is computed from the layer inputs (queries/keys with RoPE) so fast attention kernels stay on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from myvlm.backends.base import CAPTION, VQA, Backend, Batch, normalized


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
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def _register_hooks(self) -> None:
        projector = self.model.model.multi_modal_projector
        self._handles.append(projector.register_forward_hook(self._append_concepts))
        for layer in self.model.model.language_model.layers:
            self._handles.append(layer.self_attn.register_forward_pre_hook(self._record_attention, with_kwargs=True))

    def prompt(self, task: str, identifiers: Sequence[str] = (), question: str | None = None) -> str:
        if task == CAPTION:
            instruction = f"Please caption this image of {' and '.join(identifiers)}." if identifiers else (
                "Please caption this image."
            )
        else:
            instruction = question
        return f"USER: <image>\n{instruction} ASSISTANT:"

    def encode(self, images, prompts, n_concepts, targets=None) -> Batch:
        rows, label_rows, prompt_lengths, positions, pixels = [], [], [], [], []
        for index, (image, prompt, k) in enumerate(zip(images, prompts, n_concepts, strict=True)):
            encoded = self.processor(images=[image], text=[prompt], return_tensors="pt")
            prompt_ids = encoded["input_ids"][0].tolist()
            pixels.append(encoded["pixel_values"][0])
            ids = prompt_ids + (self.answer_ids(prompt, targets[index]) if targets else [])
            labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
            # k extra image-token slots right after the last image token carry the concept vectors.
            after_image = max(i for i, t in enumerate(ids) if t == self.image_token_id) + 1
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
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": torch.stack(pixels)}
        if targets:
            inputs["labels"] = self.pad(label_rows, -100, left)
        return Batch(inputs, prompt_lengths, [[p + s for p in pos] for pos, s in zip(positions, shifts, strict=True)])

    # --- hooks ---------------------------------------------------------------------------------------------------
    def _append_concepts(self, module, args, image_tokens: torch.Tensor):
        """[B, N, D] projected image tokens -> [1, Σ(N+k_i), D]: HF flattens the batch before scattering anyway."""
        if self.injection is None or not self.injection.any:
            return None
        pieces = []
        for sample_tokens, vectors in zip(image_tokens, self.injection.vectors, strict=True):
            pieces.append(sample_tokens)
            if len(vectors):
                scale = sample_tokens.float().norm(dim=-1).mean()
                pieces.append((normalized(vectors) * scale).to(sample_tokens.dtype))
        return torch.cat(pieces).unsqueeze(0)

    def _record_attention(self, attention, args, kwargs):
        """Attention probabilities of each concept token's row, from the layer's own q/k projections and RoPE."""
        injection = self.injection
        if injection is None or not injection.record_attention or not injection.any:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        mask2d = injection.batch.inputs["attention_mask"].to(hidden.device)
        seq_len = hidden.shape[1]
        heads, kv_heads = attention.config.num_attention_heads, attention.config.num_key_value_heads
        head_dim = attention.head_dim
        terms = []
        for b, rows in enumerate(injection.batch.concept_positions):
            # RoPE tables are [1, S, d] when every sample shares positions, else [B, S, d].
            cos_b, sin_b = (cos[b : b + 1], sin[b : b + 1]) if cos.shape[0] > 1 else (cos, sin)
            for row in rows:
                q = attention.q_proj(hidden[b, row : row + 1]).view(1, 1, heads, head_dim).transpose(1, 2)
                k = attention.k_proj(hidden[b, : row + 1]).view(1, row + 1, kv_heads, head_dim).transpose(1, 2)
                q, _ = apply_rotary_pos_emb(q, q, cos_b[:, row : row + 1], sin_b[:, row : row + 1])
                _, k = apply_rotary_pos_emb(k, k, cos_b[:, : row + 1], sin_b[:, : row + 1])
                k = repeat_kv(k, heads // kv_heads)
                scores = (q @ k.transpose(-1, -2)).float() * attention.scaling  # [1, H, 1, row+1]
                scores = scores.masked_fill(mask2d[b, : row + 1] == 0, float("-inf"))
                probs = scores.softmax(dim=-1)
                # Official: mean over heads and *all* key positions of the padded batch (masked ones are zeros).
                terms.append((probs**2).sum() / (heads * seq_len))
        # Summed over samples, as the official loop does (its λ values assume that).
        injection.attention_terms.append(torch.stack(terms).sum())
        return None
