"""The regularizer's attention probe for any HF language model, read from the layer's own queries and keys.

The language model's attention implementation (sdpa, eager, flash, ...) is wrapped under a new registered name: the
wrapper calls the original function with the original arguments, so outputs are bit-identical and fast kernels stay
on, and while an injection records attention it recomputes, for the concept tokens' rows only, the softmax from the
query and key states the layer hands its kernel. Those states already carry the family's own projections, norms and
rotary variant (1-D RoPE, M-RoPE, ...), the cached prefix's keys, and the layer's mask (causal, padding, sliding
window, bidirectional image blocks), so no family needs its own copy of that arithmetic.

One call takes a shorter road: a masked multi-token SDPA call of a frozen grouped-query layer (fewer key/value heads
than query heads: Qwen, Llama 3, Mistral) on the CPU. HF copies each key/value head once per query head of its group
there (`repeat_kv`) and the backward pass sums the copies' gradients back; SDPA's own grouping (`enable_gqa`) runs the
same CPU kernel on the uncopied heads, with the same outputs and gradients, and ~10 % less time per cached training
step (a short suffix against a long cached prefix, where the copies and their gradients are most of the attention's
work). A layer whose own weights train keeps HF's path: summed in another order, their gradients would differ in the
last bits from what HF's own training computes.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "myvlm_probe:"
# The backend whose injection is running (set by Backend.inject); its hooks_off() silences the probe.
RUNNING: contextvars.ContextVar = contextvars.ContextVar("myvlm_running", default=None)


def probing_name(original: str) -> str:
    """Register (once) a probing wrapper around attention implementation `original`, and return its name."""
    name = f"{PREFIX}{original}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        wrapped = ALL_ATTENTION_FUNCTIONS[original] if original != "eager" else None

        def attention(module, query, key, value, attention_mask, **kwargs):
            if wrapped is sdpa_attention_forward and _groups_on_cpu(module, query, attention_mask, kwargs):
                function = grouped_sdpa
            else:
                function = wrapped or _eager(module)
            output = function(module, query, key, value, attention_mask, **kwargs)
            backend = RUNNING.get()
            injection = backend.injection if backend is not None else None
            if (
                injection is not None
                and injection.record_attention
                and injection.any
                and module.config is backend.probe_config
            ):
                injection.attention_terms.append(concept_attention_term(injection, query, key, attention_mask, kwargs))
            return output

        AttentionInterface.register(name, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _groups_on_cpu(module, query, attention_mask, kwargs) -> bool:
    """Whether HF's SDPA call would copy key/value heads (`repeat_kv`) on the CPU of a frozen layer with nothing
    `grouped_sdpa` leaves out (a position bias or a soft cap)."""
    return (
        query.device.type == "cpu"
        and getattr(module, "num_key_value_groups", 1) > 1
        and attention_mask is not None
        and query.shape[2] > 1
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not any(parameter.requires_grad for parameter in module.parameters())
    )


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """HF's SDPA attention for the calls `_groups_on_cpu` picks (with a mask HF's call is not causal either), with
    SDPA's own head grouping instead of copied key/value heads."""
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


def _eager(module):
    """The family's own eager attention (some families scale or cap it their way), found in its modeling module."""
    import sys

    return sys.modules[type(module).__module__].eager_attention_forward


class AttentionProbe:
    """Installs the probing wrapper on a language model config; `remove()` restores the original implementation."""

    def __init__(self, config) -> None:
        self.config = config
        self.install()

    def install(self) -> None:
        current = self.config._attn_implementation or "eager"
        if not current.startswith(PREFIX):
            self.original = current
            self.config._attn_implementation = probing_name(current)

    def remove(self) -> None:
        self.config._attn_implementation = self.original


def concept_attention_term(injection, query, key, attention_mask, kwargs) -> torch.Tensor:
    """Σ over samples and concept rows of mean(p²) over heads and all key positions (the official normalization).

    query [B, H, S, d] (this pass's rows), key [B, KV, T, d] (with any cached prefix); the concept rows are
    full-sequence positions, so row r of the sequence is query row r - (T - S). All concept rows of the batch are
    scored at once (one small product per layer, not one per row: the step is short and per-op overhead counts)."""
    if injection.batch is None:
        raise RuntimeError("recording attention needs the batch: pass it to inject()/activate(), or use loss()")
    rows = concept_rows(injection, query.device)
    if rows is None:
        return query.new_zeros((), dtype=torch.float32)
    heads, kv_heads = query.shape[1], key.shape[1]
    keys_total, offset = key.shape[2], key.shape[2] - query.shape[2]
    queries = query[rows.samples, :, rows.positions - offset]  # [N, H, d]
    grouped = queries.view(len(rows.samples), kv_heads, heads // kv_heads, -1)  # head h reads key head h // (H / KV)
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    # One concept row per sample, in order (the usual training batch): the keys as they are, no gather to undo.
    keys = key if rows.one_per_sample and len(rows.samples) == len(key) else key[rows.samples]
    scores = (grouped @ keys.transpose(-1, -2)).float().view(len(rows.samples), heads, keys_total) * scaling
    softcap = kwargs.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    probs = _masked(scores, attention_mask, rows, offset).softmax(dim=-1)
    return (probs**2).sum() / (heads * keys_total)


@dataclass(frozen=True)
class ConceptRows:
    """The batch's concept rows as index tensors: sample, sequence position, and whether they are one per sample in
    sample order; the batch's padding mask."""

    batch: object
    samples: torch.Tensor
    positions: torch.Tensor
    one_per_sample: bool
    padding: torch.Tensor


def concept_rows(injection, device) -> ConceptRows | None:
    """The injection's batch's concept rows on `device` (None: it has none), made once per batch: every attention
    layer of a pass asks for them."""
    made = injection.probe_rows
    if made is None or made.batch is not injection.batch or made.samples.device != torch.device(device):
        batch = injection.batch
        pairs = [(b, row) for b, rows in enumerate(batch.concept_positions) for row in rows]
        if not pairs:
            return None
        samples = [b for b, _ in pairs]
        made = injection.probe_rows = ConceptRows(
            batch,
            torch.tensor(samples, device=device),
            torch.tensor([row for _, row in pairs], device=device),
            samples == list(range(len(samples))),
            batch.inputs["attention_mask"].to(device),
        )
    return made


def _masked(scores, attention_mask, rows: ConceptRows, offset: int) -> torch.Tensor:
    """[N, H, T] scores under the layer's own mask rows where it has one (bool: keep, float: additive), else causal
    plus padding."""
    if attention_mask is not None and attention_mask.dim() == 4:
        chosen = rows.samples if attention_mask.shape[0] > 1 else torch.zeros_like(rows.samples)
        mask = attention_mask[chosen, :, rows.positions - offset]  # [N, 1 or H, T]
        if mask.dtype == torch.bool:
            return scores.masked_fill(~mask, float("-inf"))
        return scores + mask.float()
    keys_total = scores.shape[-1]
    keep = torch.arange(keys_total, device=scores.device) <= rows.positions[:, None]
    padding = rows.padding[rows.samples, :keys_total]
    return scores.masked_fill(~(keep & (padding != 0))[:, None], float("-inf"))
