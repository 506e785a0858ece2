"""Tiny models of each supported VLM family, built offline from the real transformers classes.

Each module here exposes `BUILDERS` (model_type -> build(folder, seed) writing a model folder `myvlm.load` takes) and
`DYNAMIC_RESOLUTION` (whether images of different sizes give different token counts). `tests/test_families.py` runs
the whole matrix on every builder, so a new family's tests are its builder module.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_WORDS = "system user assistant model Assistant User".split()


@functools.cache
def toy_words() -> tuple[str, ...]:
    """Every word of the toy world's prompts, captions and questions (the learning proof pretrains on them)."""
    from myvlm.toyworld.models import _corpus

    words = {w for line in _corpus(400) for w in re.findall(r"\w+|[^\w\s]", line)}
    words |= set("Please caption this image of and . , ? : What is doing".split())
    return tuple(sorted(words))


def word_tokenizer(specials: list[str], **special_tokens) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the toy world's words plus the family's special tokens (`specials`, first ids in
    order). `special_tokens` are PreTrainedTokenizerFast keywords (bos_token=..., pad_token=..., chat_template=...)."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, "<unk>", *CHAT_WORDS, *toy_words()]))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", **special_tokens)
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in fast.all_special_tokens]})
    return fast


def tiny_text(tokenizer, **fields) -> dict:
    """The language model every fixture uses (2 layers of width 64, the tokenizer's special ids, untied embeddings:
    tied tiny models repeat the last prompt token); `fields` change or add settings."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
        **fields,
    }


def tiny_vision(**fields) -> dict:
    """The vision tower the CLIP/SigLIP-style fixtures use (2 layers of width 32); `fields` add image and patch size."""
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, **fields}


def builders() -> dict[str, tuple[callable, bool]]:
    """model_type -> (build, dynamic resolution), from every module of this package."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for model_type, build in module.BUILDERS.items():
            found[model_type] = (build, module.DYNAMIC_RESOLUTION)
    return found


def pretraining_names(model_type: str) -> int:
    """How many toy names the learning proof pretrains this family's fixture on (`PRETRAIN_NAMES` in its module)."""
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if model_type in module.BUILDERS:
            return getattr(module, "PRETRAIN_NAMES", {}).get(model_type, 28)
    raise KeyError(model_type)


def pretrain_on_toyworld(vlm, steps: int = 300, seed: int = 0, batch_size: int = 8, names: int = 28):
    """Briefly pretrain a whole tiny VLM on toy-world captions, the way the toy models are: a scene is captioned
    ("a small red circle is on the left ."), and when a named object's vector sits in the concept slot (through the
    library's own injection) and its name is in the prompt, the caption names it ("Mia is a small red circle ...").
    A random LM ignores its inputs; this one reads its visual tokens and can say a name, so a learned concept vector
    has a path to follow, as in a pretrained VLM."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from myvlm.backends import CAPTION
    from myvlm.toyworld import NAMES, caption, render_scene, sample_scene, with_names

    backend, width = vlm.backend, vlm.concept_width
    generator = torch.Generator().manual_seed(seed)
    known = NAMES[:names]  # fewer names, each seen more often, where a family's fixture learns them slower
    codes = {name: F.normalize(torch.randn(width, generator=generator), dim=0) for name in known}
    rng = np.random.default_rng(seed)
    vlm.model.train()
    vlm.model.requires_grad_(True)
    optimizer = torch.optim.Adam([p for p in vlm.model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(steps):
        images, targets, slots, prompts = [], [], [], []
        for index in range(batch_size):
            scene = sample_scene(seed * 1_000_000 + step * batch_size + index)
            images.append(render_scene(scene))
            name = known[rng.integers(len(known))] if rng.random() < 0.6 else None
            if name is None:
                slots.append(torch.zeros(0, width))
                targets.append(caption(with_names(scene, {})))
                prompts.append(backend.prompt(CAPTION))
            else:  # the name's direction plus noise, as a learned vector starts out
                noise = torch.randn(width, generator=generator) * 2 * float(rng.random()) / width**0.5
                slots.append((codes[name] + noise)[None])
                targets.append(caption(with_names(scene, {0: name})))
                prompts.append(backend.prompt(CAPTION, [name]))
        batch = backend.encode(images, prompts, [len(s) for s in slots], targets)
        with backend.inject(slots, batch=batch):
            loss = backend.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vlm.model.eval()
    vlm.model.requires_grad_(False)
    return vlm


def full_and_cached_steps(vlm, images, batch, task: str, start) -> list[tuple]:
    """(loss, regularizer, gradient) of one training step with concept "bobby" (vector `start`) in every sample,
    first from the full forward, then from the cached one (`cache_views`)."""
    import torch

    results = []
    for views in (None, vlm.backend.cache_views(images)):
        vector = torch.nn.Parameter(start.clone())
        vlm.add_concept("bobby", "Bobby", vector.detach())
        vlm.concepts.set("bobby", vector)
        with vlm.activate([["bobby"]] * len(images), record_attention=True, batch=batch):
            loss = vlm.backend.loss(batch) if views is None else vlm.backend.cached_loss(batch, views)
            regularizer = vlm.backend.regularizer(task)
        (loss + regularizer).backward()
        results.append((loss.detach(), regularizer.detach(), vector.grad))
    return results
