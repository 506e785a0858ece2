"""Two tiny VLMs of the real HF architectures (LLaVA-1.5 style and BLIP-2/OPT), pretrained on the toy world.

They stand in for real pretrained VLMs: same classes, processors and prompt formats, so every personalization code path
runs unchanged. Pretraining also teaches the slot MyVLM uses: scenes with *named* objects (arbitrary objects, arbitrary
names) get one extra vector per name right after the visual tokens, holding the mean visual features of that object
(LLaVA: half the time from the mirrored image; BLIP-2: a fixed direction coding the name plus a random share of the
object's feature direction, since its captioning prompt is empty; BLIP-2's slot enters through the library's own
concept hooks). A learned concept embedding placed there later therefore lands in a slot the model already reads.
Pretraining objects never carry a personal-concept mark.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from myvlm.toynames import TOY_BLIP2, TOY_LLAVA, TOY_MODELS
from myvlm.toyworld.world import (
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    MARK_COLORS,
    MARK_KINDS,
    NAMES,
    NUMBER_WORDS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Scene,
    _mask,
    caption,
    caption_attribute_accuracy,
    caption_order,
    caption_prompt,
    horizontal_position,
    mark_mask,
    relation,
    render_scene,
    sample_scene,
    vqa_pairs,
    with_names,
)

# The toy world's CLIP: object heads of toy concepts are probes on toy-llava's CLIP vision tower, for both toy VLMs, as
# MyVLM's object heads use CLIP ViT-L/14 whether the VLM is LLaVA or BLIP-2.
HEAD_ENCODER = f"vision-tower:{TOY_LLAVA}"
PATCH = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2
NUM_QUERY_TOKENS = 16
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD_ID, BOS_ID, EOS_ID, _, IMAGE_ID = range(5)  # the 4th is <unk>, which the tokenizer finds by its string
VOCAB_SIZE = 1024
EVAL_SEED_BASE = 1 << 40  # held-out scenes: never drawn during pretraining (train seeds stay below 2**32)
TRAIN = {  # vision pretraining steps, caption/VQA steps, batch size: sized for <= 15 min on 2 CPU threads
    TOY_LLAVA: {"vision_steps": 2400, "steps": 2000, "batch": 32, "lr": 3e-3, "object_centred": True},
    TOY_BLIP2: {"vision_steps": 1200, "steps": 3200, "batch": 32, "lr": 1.5e-3, "object_centred": False},
}  # object_centred: stage 1 as described in _pretrain_vision; toy-blip2 keeps the plain per-patch recipe
VISION_LR = 2e-3
# Weights of stage 1's object-level losses (an object's shape, colour, size, texture, mark kind and mark colour
# predicted from the mean of its patches), and of the per-patch mark losses. A shape is a property of the whole outline
# that no single patch shows; the weights stay balanced because the language model learns first what varies most in
# the tower's features (a shape-only object loss left shape half of that variance, and colour was then never learnt),
# and the per-patch mark losses are raised so that object-level losses do not crowd out the marks concept heads need.
OBJECT_LOSS_WEIGHTS = (2.0, 2.0, 1.0, 1.0, 2.0, 2.0)
PATCH_MARK_WEIGHT = 5.0
# Share of named multi-object scenes that name two objects: BLIP-2 reads both names out of its slots, so it sees more.
TWO_NAMES_RATE = {TOY_LLAVA: 0.2, TOY_BLIP2: 0.5}
# Share of toy-blip2's pretraining samples that are a question in BLIP-2's VQA prompt instead of a caption.
BLIP2_VQA_RATE = 0.3
# Share of LLaVA's named-object slots taken from the mirrored image (see _llava_loss).
MIRRORED_SLOT_RATE = 0.5
# Weight of LLaVA's auxiliary position loss in the language-model stage (see _llava_loss).
POSITION_LOSS_WEIGHT = 0.2
# Share of pretraining objects that carry a generic mark (dots, a hat), never a personal concept's combination: the
# vision tower learns to see marks (as CLIP knows polka dots), so a concept head can tell a concept from its twin.
MARK_RATE = 0.3


def model_path(name: str) -> Path:
    """The packaged folder of a toy model, loadable with the usual ``from_pretrained``."""
    if name not in TOY_MODELS:
        raise ValueError(f"unknown toy model {name!r}; choose one of {', '.join(TOY_MODELS)}")
    return Path(__file__).parent / "models" / name


def llava_prompt(instruction: str) -> str:
    """The LLaVA-1.5 conversation format the toy LLaVA is pretrained on."""
    return f"USER: <image>\n{instruction} ASSISTANT:"


def blip2_vqa_prompt(question: str) -> str:
    """BLIP-2's VQA prompt format, in which toy-blip2 is pretrained to answer."""
    return f"Question: {question} Answer:"


# ---------------------------------------------------------------- tokenizer


def _corpus(n_scenes: int = 4000) -> list[str]:
    """Tokenizer training text: every prompt form, every name, and captions/VQA of seeded scenes."""
    rng = np.random.default_rng(123)
    lines = [llava_prompt(caption_prompt()), blip2_vqa_prompt("How many objects are there?")]
    lines += [" ".join(w for w in (*SHAPES, *COLORS, *SIZES, *TEXTURES, *BACKGROUNDS, *NUMBER_WORDS))] * 20
    lines += [f"{n} is {n}. {caption_prompt([n])} Where is {n} in the image?" for n in NAMES for _ in range(20)]
    for s in range(n_scenes):
        scene = sample_scene(int(rng.integers(1 << 31)))
        if s % 2:
            scene = with_names(scene, {0: NAMES[int(rng.integers(len(NAMES)))]})
        lines.append(caption(scene))
        lines += [f"{blip2_vqa_prompt(q)} {a}" for q, a in vqa_pairs(scene, rng)]
    return lines


def build_tokenizer(image_token_attribute: bool = True):
    """Byte-level BPE trained on the grammar, prompts and names: small vocabulary, natural decoding.

    ``<image>`` is always a special token; BLIP-2's processor breaks on a tokenizer that also names it as its
    ``image_token`` attribute, so the BLIP-2 tokenizer does not (like the official BLIP-2 checkpoints).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    extra = {"extra_special_tokens": {"image_token": "<image>"}} if image_token_attribute else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=256,
        **extra,
    )
    assert [fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(5))
    return fast


# ---------------------------------------------------------------- models


def _configs(name: str):
    from transformers import (
        Blip2Config,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        OPTConfig,
    )

    special = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    if name == TOY_LLAVA:
        vision = CLIPVisionConfig(
            hidden_size=96,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            projection_dim=96,
        )
        text = LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            **special,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=IMAGE_ID,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            image_seq_length=NUM_PATCHES,
            tie_word_embeddings=True,
        )
    else:
        vision = Blip2VisionConfig(
            hidden_size=96,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            initializer_range=0.02,
        )
        qformer = Blip2QFormerConfig(
            hidden_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            encoder_hidden_size=96,
            cross_attention_frequency=1,
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=64,
        )
        text = OPTConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=128,
            ffn_dim=352,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=128,
            tie_word_embeddings=True,
            **special,
        )
        config = Blip2Config(
            vision_config=vision.to_dict(),
            qformer_config=qformer.to_dict(),
            text_config=text.to_dict(),
            num_query_tokens=NUM_QUERY_TOKENS,
            image_token_index=IMAGE_ID,
            tie_word_embeddings=True,
        )
    return config


def _new_model(name: str):
    from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    config = _configs(name)
    if name == TOY_LLAVA:
        return LlavaForConditionalGeneration._from_config(config, attn_implementation="eager")
    model = Blip2ForConditionalGeneration._from_config(config, attn_implementation="eager")
    with torch.no_grad():  # HF initialises the queries to zeros: identical queries would stay identical forever
        model.query_tokens.normal_(0.0, config.qformer_config.initializer_range)
    return model


def _processor(name: str, tokenizer):
    from transformers import Blip2Processor, BlipImageProcessor, CLIPImageProcessor, LlavaProcessor

    norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    if name == TOY_LLAVA:
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **norm
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **norm)
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=NUM_QUERY_TOKENS)


def pixels(images) -> torch.Tensor:
    """Exactly what both saved processors produce for 64 px RGB images (rescale, normalize to [-1, 1])."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def name_code(name: str, dim: int) -> torch.Tensor:
    """Fixed unit direction by which BLIP-2 pretraining tells the model a named object's name (its caption prompt is
    empty). A direction, not a magnitude: the library L2-normalizes a concept vector before it enters."""
    rng = np.random.default_rng([NAMES.index(name), dim, 11])
    return F.normalize(torch.from_numpy(rng.standard_normal(dim).astype(np.float32)), dim=0)


def blip2_slot(patch_mean: torch.Tensor, name: str | None, weight: float = 1.0) -> torch.Tensor:
    """A named object's BLIP-2 slot: its name's direction plus ``weight`` times the direction of its mean patch
    features, so both survive the library's L2 normalization, post-LayerNorm and key/value rescaling. Pretraining
    draws the weight from [0, 1), so the name alone already fills the slot (as a learned concept vector must)."""
    vec = F.normalize(patch_mean, dim=-1)
    return weight * vec + name_code(name, vec.shape[-1]) if name else vec


def object_patches(obj) -> list[int]:
    """Indices of the 8x8 patches whose centre lies on the object (at least the patch holding its centre)."""
    mask = _mask(obj)[PATCH // 2 :: PATCH, PATCH // 2 :: PATCH].reshape(-1)
    idx = np.flatnonzero(mask).tolist()
    return idx or [(obj.y // PATCH) * (IMAGE_SIZE // PATCH) + obj.x // PATCH]


# ---------------------------------------------------------------- pretraining data


def _sample(rng: np.random.Generator, seed: int, model: str) -> tuple[Scene, list[tuple[str, str]]]:
    """(scene, turns): a base or named caption, for LLaVA with a follow-up VQA turn (or a VQA first turn), for BLIP-2
    a caption or, in ``BLIP2_VQA_RATE`` of the samples, one question instead."""
    scene = sample_scene(seed, mark_rate=MARK_RATE)
    # name arbitrary objects with arbitrary names in half the scenes: the model learns to follow the slot (BLIP-2
    # reads the name itself out of the slot, its caption prompt being empty; LLaVA copies it from the prompt).
    if rng.random() < 0.5:
        n_named = 2 if len(scene.objects) >= 2 and rng.random() < TWO_NAMES_RATE[model] else 1
        idx = sorted(rng.permutation(len(scene.objects))[:n_named].tolist())
        names = [NAMES[i] for i in rng.permutation(len(NAMES))[:n_named]]
        scene = with_names(scene, dict(zip(idx, names, strict=True)))
    pairs = vqa_pairs(scene, rng)
    question = pairs[int(rng.integers(len(pairs)))]
    if model == TOY_BLIP2:  # one turn: a caption from the empty prompt, or an answer after "Question: … Answer:"
        vqa = rng.random() < BLIP2_VQA_RATE
        return scene, [(blip2_vqa_prompt(question[0]), question[1]) if vqa else ("", caption(scene))]
    turns = [(caption_prompt([scene.names[i] for i in sorted(scene.names)]), caption(scene))]
    if rng.random() < 0.3:
        turns = [question]
    elif rng.random() < 0.7:
        turns.append(question)
    return scene, turns


def _ref_order(scene: Scene) -> list[int]:
    """Object indices of the named objects in the order their extra slots follow the visual tokens."""
    return sorted(scene.names)


def _batch(model_name: str, tokenizer, rng: np.random.Generator, seeds: list[int]):
    """Token ids (LLaVA-1.5 multi-turn format, or BLIP-2's query tokens + BOS + caption), loss labels, slots, and
    every object's patches and horizontal third."""
    items = [_sample(rng, s, model_name) for s in seeds]
    pix = pixels([render_scene(sc) for sc, _ in items])
    ids, labels, refs, places = [], [], [], []
    for scene, turns in items:
        slots = _ref_order(scene)
        if model_name == TOY_LLAVA:
            prompt = llava_prompt(turns[0][0]).replace("<image>", "<image>" * (NUM_PATCHES + len(slots)))
            seq = tokenizer(prompt)["input_ids"]
            lab = [-100] * len(seq)
            for k, (question, answer) in enumerate(turns):
                if k:
                    follow = tokenizer(f"USER: {question} ASSISTANT:", add_special_tokens=False)["input_ids"]
                    seq, lab = seq + follow, lab + [-100] * len(follow)
                answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
                seq, lab = seq + answer_ids, lab + answer_ids
        else:
            prompt, answer = turns[0]
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
            answer_ids = tokenizer(f" {answer}" if prompt else answer, add_special_tokens=False)["input_ids"]
            seq = [IMAGE_ID] * NUM_QUERY_TOKENS + [BOS_ID] + prompt_ids + answer_ids + [EOS_ID]
            lab = [-100] * (NUM_QUERY_TOKENS + 1 + len(prompt_ids)) + answer_ids + [EOS_ID]
        ids.append(seq)
        labels.append(lab)
        patches = [object_patches(o) for o in scene.objects]
        refs.append([(patches[i], scene.names[i]) for i in slots])
        places.append(
            [(p, POSITIONS.index(horizontal_position(o))) for p, o in zip(patches, scene.objects, strict=True)]
        )
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [PAD_ID] * (width - len(x)) for x in ids])
    label_t = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(x) for x in ids])[:, None]).long()
    return pix, input_ids, label_t, mask, refs, places


def _llava_image_features(model, pix) -> torch.Tensor:
    feats = model.model.get_image_features(
        pix, vision_feature_layer=-1, vision_feature_select_strategy="default"
    ).pooler_output
    return torch.stack(list(feats))  # (B, 64, D)


def _llava_embeds(model, input_ids, feats, extras) -> torch.Tensor:
    """Text embeddings with the image tokens replaced by the visual features followed by each sample's extra slots."""
    embeds = model.get_input_embeddings()(input_ids)
    rows = [torch.cat([feats[b], *[e[None] for e in extras[b]]], 0) for b in range(len(extras))]
    width = max(r.shape[0] for r in rows)
    source = torch.stack([F.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])
    is_image = input_ids == IMAGE_ID
    order = (torch.cumsum(is_image.long(), 1) - 1).clamp(min=0)
    gathered = torch.gather(source, 1, order[..., None].expand(-1, -1, source.shape[-1]))
    return torch.where(is_image[..., None], gathered, embeds)


def _mirrored_patches(patches: list[int]) -> list[int]:
    """The same patches in the horizontally mirrored image."""
    side = IMAGE_SIZE // PATCH
    return [p - p % side + side - 1 - p % side for p in patches]


def _llava_loss(model, pix, input_ids, labels, mask, refs, places, position_head):
    """Half the named objects' slots come from the mirrored image: the slot then tells what the object looks like but
    not where it is, so the model learns to find the object in the image, as it must for a learned concept vector
    (trained on photos with the concept anywhere); otherwise "Where is Mia?" is read off the slot.

    ``position_head`` (thrown away after pretraining) predicts each object's horizontal third from the mean of its
    projected patches: without it the projector drops the position the tower knows and position questions stay at
    chance (benchmarks/RESULTS.md)."""
    feats = _llava_image_features(model, pix)
    mirrored = _llava_image_features(model, pix.flip(-1))
    flips = iter((torch.rand(sum(len(r) for r in refs)) < MIRRORED_SLOT_RATE).tolist())
    extras = [
        [mirrored[b, _mirrored_patches(p)].mean(0) if next(flips) else feats[b, p].mean(0) for p, _ in refs[b]]
        for b in range(len(refs))
    ]
    embeds = _llava_embeds(model, input_ids, feats, extras)
    pooled = torch.stack([feats[b, patches].mean(0) for b, objects in enumerate(places) for patches, _ in objects])
    thirds = torch.tensor([third for objects in places for _, third in objects])
    position_loss = F.cross_entropy(position_head(pooled), thirds)
    return model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss + POSITION_LOSS_WEIGHT * position_loss


def _blip2_query_embeds(backend, vis, extras) -> torch.Tensor:
    """Q-Former outputs projected into the LM, cross-attending to the visual states plus each sample's extra slots.

    The slots enter through the library's own BLIP-2 backend (``myvlm.backends.blip2``), exactly as a learned concept
    vector does later: L2-normalized, through the vision encoder's post-LayerNorm, appended as extra encoder tokens,
    unused slots masked, and each slot's cross-attention key/value rescaled to the image tokens' mean norm.
    """
    width = vis.shape[-1]
    vectors = [torch.stack(list(e)) if len(e) else vis.new_zeros(0, width) for e in extras]
    with backend.inject(vectors):
        return backend.image_features(vis)[0]


def _blip2_loss(model, pix, input_ids, labels, mask, refs, places, backend):
    vis = model.vision_model(pix).last_hidden_state  # (B, 1 + 64, Dv); frozen, no concept hooks active here
    weights = torch.rand(sum(len(r) for r in refs)).tolist()  # seeded by build_model: deterministic
    extras = [
        [blip2_slot(vis[b, 1 + torch.tensor(p)].mean(0), n, weights.pop()) for p, n in refs[b]]
        for b in range(len(refs))
    ]
    embeds = model.get_input_embeddings()(input_ids)
    embeds = torch.cat([_blip2_query_embeds(backend, vis, extras), embeds[:, NUM_QUERY_TOKENS:]], 1)
    logits = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _patch_labels(scenes: list[Scene], background_on_objects: bool = True) -> torch.Tensor:
    """Per patch, for the object under its centre (0 = none): shape, colour, size, texture, its place in the caption's
    order, its relation to the other object of a pair, its horizontal position, its mark's kind and colour; and the
    background everywhere, or (``background_on_objects=False``) only where no object is, so that an object's patches
    describe the object and a concept head trained on 4 photos does not learn their backgrounds."""
    labels = np.zeros((len(scenes), NUM_PATCHES, len(_HEAD_SIZES)), dtype=np.int64)
    for b, scene in enumerate(scenes):
        labels[b, :, -1] = BACKGROUNDS.index(scene.background)
        objs = scene.objects
        for rank, i in enumerate(caption_order(scene)):
            obj = objs[i]
            rel = RELATIONS.index(relation(obj, objs[1 - i])) + 1 if len(objs) == 2 else 0
            hit = _mask(obj)[PATCH // 2 :: PATCH, PATCH // 2 :: PATCH].reshape(-1)
            targets = _object_labels(obj)
            attributes, mark = targets[:4], targets[4:]
            position = POSITIONS.index(horizontal_position(obj)) + 1
            labels[b, hit, :-1] = [*(a + 1 for a in attributes), rank + 1, rel, position, *mark]
            if not background_on_objects:
                labels[b, hit, -1] = -100  # cross_entropy's ignore_index
            if obj.mark:  # a hat sits above the body: every patch showing part of the mark learns it too
                side = IMAGE_SIZE // PATCH
                shown = mark_mask(obj).reshape(side, PATCH, side, PATCH).any(axis=(1, 3)).reshape(-1)
                labels[b, shown, -3:-1] = mark
    return torch.from_numpy(labels)


_HEAD_SIZES = (
    len(SHAPES) + 1,
    len(COLORS) + 1,
    len(SIZES) + 1,
    len(TEXTURES) + 1,
    4,
    len(RELATIONS) + 1,
    len(POSITIONS) + 1,
    len(MARK_KINDS) + 1,
    len(MARK_COLORS) + 1,
    len(BACKGROUNDS),
)


_OBJECT_CLASSES = (len(SHAPES), len(COLORS), len(SIZES), len(TEXTURES), len(MARK_KINDS) + 1, len(MARK_COLORS) + 1)


def _object_labels(obj) -> list[int]:
    """Targets of the object-level losses: shape, colour, size, texture, mark kind and mark colour (0 = no mark)."""
    mark_kind, mark_color = obj.mark.split(":") if obj.mark else (None, None)
    return [
        SHAPES.index(obj.shape),
        list(COLORS).index(obj.color),
        list(SIZES).index(obj.size),
        TEXTURES.index(obj.texture),
        MARK_KINDS.index(mark_kind) + 1 if mark_kind else 0,
        list(MARK_COLORS).index(mark_color) + 1 if mark_color else 0,
    ]


def _pretrain_vision(name: str, model, seed: int, steps: int, batch: int, progress: bool, start: float) -> None:
    """Stage 1, our stand-in for the CLIP/EVA pretraining real VLMs start from: every patch learns to predict the
    attributes of the object under it. This dense signal teaches the vision tower far faster than captions alone; the
    linear heads are thrown away. An object-centred tower (toy-llava's, the toy world's CLIP) also predicts each
    object's attributes from the mean of its patches (``OBJECT_LOSS_WEIGHTS``), weighs the per-patch mark losses
    ``PATCH_MARK_WEIGHT`` times, and leaves the background to the patches no object covers."""
    vision = model.model.vision_tower if name == TOY_LLAVA else model.vision_model
    heads = torch.nn.Linear(vision.config.hidden_size, sum(_HEAD_SIZES))
    params = list(vision.parameters()) + list(heads.parameters())
    object_centred = TRAIN[name]["object_centred"]
    mark_weight = PATCH_MARK_WEIGHT if object_centred else 1.0
    patch_weights = (1.0,) * 7 + (mark_weight, mark_weight, 1.0)  # _HEAD_SIZES order: mark kind and colour raised
    if object_centred:
        object_heads = torch.nn.Linear(vision.config.hidden_size, sum(_OBJECT_CLASSES))
        params += list(object_heads.parameters())
    opt = torch.optim.AdamW(params, lr=VISION_LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * (1 - s / steps))
    for step in range(steps):
        rng = np.random.default_rng([seed, step, 4])
        scenes = [sample_scene(int(s), mark_rate=MARK_RATE) for s in rng.integers(0, 1 << 32, batch)]
        hidden = vision(pixels([render_scene(sc) for sc in scenes])).last_hidden_state[:, 1:]
        logits = torch.split(heads(hidden), _HEAD_SIZES, dim=-1)
        labels = _patch_labels(scenes, background_on_objects=not object_centred)
        loss = sum(
            w * F.cross_entropy(lg.flatten(0, 1), labels[..., k].flatten())
            for k, (w, lg) in enumerate(zip(patch_weights, logits, strict=True))
        )
        if object_centred:
            objects = [(b, object_patches(o), _object_labels(o)) for b, sc in enumerate(scenes) for o in sc.objects]
            pooled = torch.stack([hidden[b, patches].mean(0) for b, patches, _ in objects])
            targets = torch.tensor([target for *_, target in objects])
            object_logits = torch.split(object_heads(pooled), _OBJECT_CLASSES, dim=-1)
            loss = loss + sum(
                w * F.cross_entropy(lg, targets[:, k])
                for k, (w, lg) in enumerate(zip(OBJECT_LOSS_WEIGHTS, object_logits, strict=True))
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if progress and (step % 100 == 0 or step == steps - 1):
            print(f"[{name}] vision step {step}/{steps} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)


def build_model(
    name: str, out_dir, seed: int = 0, progress: bool = True, steps: int | None = None, threads: int = 1
) -> Path:
    """Pretrain a toy VLM from the seed and save it (weights, config, tokenizer, processor) to ``out_dir``.

    Same seed, torch version and thread count give the same bytes: all randomness flows from the seed and torch runs
    with deterministic algorithms.
    """
    if name not in TOY_MODELS:
        raise ValueError(f"unknown toy model {name!r}; choose one of {', '.join(TOY_MODELS)}")
    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return _pretrain(name, Path(out_dir), seed, progress, steps)
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


def _pretrain(name: str, out: Path, seed: int, progress: bool, steps: int | None) -> Path:
    start = time.time()
    tokenizer = build_tokenizer(image_token_attribute=name == TOY_LLAVA)
    model = _new_model(name)
    model.train()
    hp = TRAIN[name]
    steps = steps or hp["steps"]
    _pretrain_vision(name, model, seed, max(1, steps * hp["vision_steps"] // hp["steps"]), hp["batch"], progress, start)
    # as in real LLaVA / BLIP-2 pretraining the vision encoder stays frozen from here on
    (model.model.vision_tower if name == TOY_LLAVA else model.vision_model).requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in trainable if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
    if name == TOY_LLAVA:  # the auxiliary position head of _llava_loss, not saved
        position_head = torch.nn.Linear(model.config.text_config.hidden_size, len(POSITIONS))
        groups.append({"params": list(position_head.parameters()), "weight_decay": 0.01})
    opt = torch.optim.AdamW(groups, lr=hp["lr"], betas=(0.9, 0.98))
    warmup = max(1, min(60, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    if name == TOY_LLAVA:

        def loss_fn(*batch):
            return _llava_loss(*batch, position_head)
    else:  # the named slots go through the library's BLIP-2 concept hooks (registered here, removed before saving)
        from myvlm.backends import backend_for

        backend = backend_for(model.config.model_type)(model, _processor(name, tokenizer))

        def loss_fn(*batch):
            return _blip2_loss(*batch, backend)

    running = None
    for step in range(steps):
        rng = np.random.default_rng([seed, step, 3])
        seeds = [int(s) for s in rng.integers(0, 1 << 32, hp["batch"])]
        loss = loss_fn(model, *_batch(name, tokenizer, rng, seeds))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decay + rest, 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if progress and (step % 50 == 0 or step == steps - 1):
            print(f"[{name}] step {step}/{steps} loss {running:.4f} {time.time() - start:.0f}s", flush=True)
    if name != TOY_LLAVA:
        backend.remove_hooks()
    model.eval()
    model.generation_config.max_new_tokens = 24
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    model.save_pretrained(out)
    _processor(name, tokenizer).save_pretrained(out)
    if progress:
        print(f"[{name}] saved to {out} after {time.time() - start:.0f}s", flush=True)
    return out


# ---------------------------------------------------------------- loading and evaluation


def load(name_or_dir):
    """(model, processor) from a toy model name or folder, through the standard ``from_pretrained`` path."""
    from transformers import AutoConfig, AutoProcessor, Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    path = model_path(name_or_dir) if name_or_dir in TOY_MODELS else Path(name_or_dir)
    kind = AutoConfig.from_pretrained(path).model_type
    cls = LlavaForConditionalGeneration if kind == "llava" else Blip2ForConditionalGeneration
    # eager attention: sdpa cannot return the attention probabilities MyVLM's attention regularizer needs
    return cls.from_pretrained(path, attn_implementation="eager").eval(), AutoProcessor.from_pretrained(path)


@torch.no_grad()
def generate(model, processor, images, instruction: str | None = None, max_new_tokens: int = 24) -> list[str]:
    """Greedy answers for a batch of images through the processor: LLaVA with the instruction (default: caption),
    BLIP-2 a caption (None) or a VQA answer."""
    is_llava = model.config.model_type == "llava"
    if is_llava:
        text = llava_prompt(instruction or caption_prompt())
    else:
        text = "" if instruction is None else blip2_vqa_prompt(instruction)
    inputs = processor(images=list(images), text=[text] * len(images), return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    out = out[:, inputs["input_ids"].shape[1] :]  # both toy LMs are decoder-only: generate() returns prompt + answer
    return [t.strip() for t in processor.tokenizer.batch_decode(out, skip_special_tokens=True)]


@torch.no_grad()
def reference_vector(model, image, obj, name: str | None = None) -> torch.Tensor:
    """What pretraining puts in a named object's slot: its mean visual features (BLIP-2: their direction plus the
    name's direction).

    Averaged over a concept's training photos it is also a natural starting point for a learned concept embedding.
    """
    pix = pixels([image])
    patches = torch.tensor(object_patches(obj))
    if model.config.model_type == "llava":
        return _llava_image_features(model, pix)[0, patches].mean(0)
    vis = model.vision_model(pix).last_hidden_state[0]
    return blip2_slot(vis[1 + patches].mean(0), name)


@torch.no_grad()
def generate_with_slots(
    model, processor, image, slots: list[torch.Tensor], instruction: str | None = None, max_new_tokens: int = 24
) -> str:
    """Greedy answer with extra vectors right after the visual tokens: the slot a MyVLM concept embedding occupies."""
    pix = pixels([image])
    tokenizer = processor.tokenizer
    if model.config.model_type == "llava":
        prompt = llava_prompt(instruction or caption_prompt())
        ids = tokenizer(prompt.replace("<image>", "<image>" * (NUM_PATCHES + len(slots))), return_tensors="pt")
        embeds = _llava_embeds(model, ids["input_ids"], _llava_image_features(model, pix), [list(slots)])
        out = model.generate(
            inputs_embeds=embeds, attention_mask=ids["attention_mask"], max_new_tokens=max_new_tokens, do_sample=False
        )
    else:  # what users get: the slot enters through the library's BLIP-2 backend during HF's own generate()
        from myvlm.backends import backend_for

        backend = backend_for(model.config.model_type)(model, processor)
        try:
            batch = backend.encode(
                [image], ["" if instruction is None else blip2_vqa_prompt(instruction)], [len(slots)]
            )
            vectors = torch.stack(list(slots)) if slots else torch.zeros(0, backend.concept_width)
            with backend.inject([vectors]):
                return backend.generate(batch, max_new_tokens=max_new_tokens)[0]
        finally:
            backend.remove_hooks()
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def evaluate_named(name_or_dir, n: int = 100) -> dict:
    """How well the pretrained slot works: with an object's reference vector in the slot (the ideal concept
    embedding), does the caption name it in subject position and keep the other attributes right?"""
    model, processor = load(name_or_dir)
    rng = np.random.default_rng(9)
    subject = correct = total = 0
    examples = []
    for scene in held_out_scenes(n, offset=20_000):
        idx, name = int(rng.integers(len(scene.objects))), NAMES[int(rng.integers(len(NAMES)))]
        image = render_scene(scene)
        slot = reference_vector(model, image, scene.objects[idx], name)
        instruction = caption_prompt([name]) if model.config.model_type == "llava" else None
        text = generate_with_slots(model, processor, image, [slot], instruction)
        subject += text.startswith(f"{name} ")
        c, t = caption_attribute_accuracy(text, scene, {name: idx})
        correct, total = correct + c, total + t
        if len(examples) < 5:
            examples.append({"caption": text, "truth": caption(with_names(scene, {idx: name}))})
    return {"subject_rate": subject / n, "attribute_accuracy": correct / total, "n_scenes": n, "examples": examples}


def held_out_scenes(n: int, offset: int = 0) -> list[Scene]:
    """Scenes no pretraining batch contains (seeds far beyond the training range)."""
    return [sample_scene(EVAL_SEED_BASE + offset + i) for i in range(n)]


def evaluate_base(name_or_dir, n: int = 200, batch: int = 50) -> dict:
    """Base quality on held-out scenes: caption attribute accuracy and VQA accuracy (one question per scene)."""
    model, processor = load(name_or_dir)
    scenes = held_out_scenes(n)
    correct = total = 0
    examples = []
    for i in range(0, n, batch):
        chunk = scenes[i : i + batch]
        for scene, text in zip(chunk, generate(model, processor, [render_scene(s) for s in chunk]), strict=True):
            c, t = caption_attribute_accuracy(text, scene)
            correct, total = correct + c, total + t
            if len(examples) < 5:
                examples.append({"caption": text, "truth": caption(scene)})
    return {
        "attribute_accuracy": correct / total,
        "vqa_accuracy": vqa_accuracy(model, processor, scenes),
        "n_scenes": n,
        "examples": examples,
    }


def vqa_accuracy(model, processor, scenes: list[Scene]) -> float:
    """Share of exact answers to one question per scene, drawn from its scene graph with a fixed seed."""
    rng = np.random.default_rng(5)
    hits = 0
    for scene in scenes:  # questions differ, so no batching across scenes
        pairs = vqa_pairs(scene, rng)
        question, answer = pairs[int(rng.integers(len(pairs)))]
        hits += generate(model, processor, [render_scene(scene)], question, max_new_tokens=6)[0] == answer
    return hits / len(scenes)
