"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL specifics: M-RoPE positions of the concept token in training, cached training and
generation; image-only processors; images of different sizes in one batch; the vision tower for heads; Qwen3-VL's zero
deepstack row for the concept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import myvlm
from families.qwen2_vl import BUILDERS
from families.qwen3_vl import BUILDERS as QWEN3_BUILDERS
from myvlm import MyVLMError
from myvlm.backends.base import CAPTION

QWEN_BUILDERS = {**BUILDERS, "qwen3_vl": QWEN3_BUILDERS["qwen3_vl"]}


@pytest.fixture(scope="module", params=sorted(QWEN_BUILDERS))
def vlm(request, tmp_path_factory):
    folder = QWEN_BUILDERS[request.param](tmp_path_factory.mktemp(request.param), 0)
    return myvlm.load(str(folder))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return myvlm.load(str(QWEN3_BUILDERS["qwen3_vl"](tmp_path_factory.mktemp("qwen3_vl"), 0)))


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def vectors(vlm, counts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(k, vlm.concept_width, generator=generator) for k in counts]


def test_processor_loads_image_only_and_saves_as_the_stock_class(vlm, tmp_path):
    from transformers.utils import is_torchvision_available

    assert not is_torchvision_available()  # this machine: the image-only path is the one under test
    assert type(vlm.processor).__name__ == vlm.backend.processor_class.__name__
    assert isinstance(vlm.processor, vlm.backend.processor_class)
    assert getattr(vlm.processor, "video_processor", None) is None
    vlm.processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == vlm.backend.processor_class.__name__


def test_images_of_different_sizes_give_different_token_counts(vlm):
    backend = vlm.backend
    prompt = backend.prompt(CAPTION)
    counts = [backend.prompt_ids(prompt, size).count(backend.image_token_id) for size in [(32, 32), (64, 48)]]
    assert counts == [4, 12]


def test_concept_takes_the_next_text_position_after_its_image_grid(vlm):
    backend = vlm.backend
    image, prompt = photo(64, 48, 1), backend.prompt(CAPTION, ["Bobby"])
    plain = backend.encode([image], [prompt], [0], ["Bobby is on the sofa ."])
    with_concept = backend.encode([image], [prompt], [1], ["Bobby is on the sofa ."])
    before, after = backend.position_ids(plain.inputs)[:, 0], backend.position_ids(with_concept.inputs)[:, 0]
    slot = with_concept.concept_positions[0][0]
    assert with_concept.inputs["input_ids"][0, slot + 1] == vlm.model.config.vision_end_token_id
    assert with_concept.inputs["mm_token_type_ids"][0, slot] == 0
    assert torch.equal(after[:, :slot], before[:, :slot])  # the image keeps its grid positions
    assert after[:, slot].tolist() == [int(before[:, :slot].max()) + 1] * 3  # the concept: the next text position
    assert torch.equal(after[:, slot + 1 :], before[:, slot:] + 1)  # everything after moves on by one


def test_generation_continues_the_positions_training_uses(vlm):
    """Greedy decoding of a left-padded batch of two sizes with concepts injected: every step's logits (prefill,
    then decoding from rope_deltas) equal one full forward over prompt + answer, whose positions training uses."""
    backend = vlm.backend
    images = [photo(32, 32, 2), photo(64, 48, 3)]
    prompts = [backend.prompt(CAPTION, ["Bobby"]), backend.prompt(CAPTION)]
    batch = backend.encode(images, prompts, [1, 0])
    inserted = vectors(vlm, [1, 0])
    with backend.inject(inserted, batch=batch):
        generated = vlm.model.generate(
            **backend.model_inputs(batch),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    steps = torch.stack(generated.logits, dim=1)  # [B, 6, V]
    full = dict(backend.model_inputs(batch))
    new = generated.sequences[:, batch.inputs["input_ids"].shape[1] :]
    full["input_ids"] = generated.sequences
    full["attention_mask"] = torch.cat([full["attention_mask"], torch.ones_like(new)], dim=1)
    full["mm_token_type_ids"] = torch.cat([full["mm_token_type_ids"], torch.zeros_like(new)], dim=1)
    with torch.no_grad(), backend.inject(inserted, batch=batch):
        logits = vlm.model(**full, use_cache=False).logits[:, -new.shape[1] - 1 : -1]
    torch.testing.assert_close(steps, logits, atol=1e-4, rtol=1e-4)


def test_cached_training_equals_the_full_step_on_a_batch_of_sizes(vlm):
    backend = vlm.backend
    images = [photo(32, 32, 4), photo(64, 48, 5), photo(48, 64, 6)]
    prompts = [backend.prompt(CAPTION, ["Bobby", "Alice"]), backend.prompt(CAPTION), backend.prompt(CAPTION, ["Bobby"])]
    targets = ["Bobby and Alice are on the sofa .", "a dog is on the grass .", "Bobby is on the table ."]
    counts = [2, 0, 1]
    results = []
    for cached in (False, True):
        inserted = [v.requires_grad_(True) for v in vectors(vlm, counts)]
        batch = backend.encode(images, prompts, counts, targets, with_pixels=not cached)
        with backend.inject(inserted, batch=batch, record_attention=True):
            loss = backend.cached_loss(batch, backend.cache_views(images)) if cached else backend.loss(batch)
            regularizer = backend.regularizer(CAPTION)
        (loss + regularizer).backward()
        results.append((loss.detach(), regularizer.detach(), inserted[0].grad, inserted[2].grad))
    for full, cached in zip(*results, strict=True):
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)


def test_tower_patches_see_every_image_at_one_size(vlm):
    patches = vlm.backend.tower_patches([photo(32, 32, 7), photo(64, 48, 8)])
    assert patches.shape == (2, 64, vlm.backend.tower_width)  # at most 64x64 pixels in 8x8 patches


def test_a_folder_without_a_chat_template_is_named(tmp_path):
    folder = BUILDERS["qwen2_vl"](tmp_path / "model", 0)
    (folder / "chat_template.jinja").unlink()
    vlm = myvlm.load(str(folder))
    with pytest.raises(MyVLMError, match="no chat template"):
        vlm.caption([photo(32, 32, 0)])


def test_an_image_the_processor_refuses_is_one_clear_error_in_captioning_and_training(vlm):
    """Qwen's image processor refuses aspect ratios over 200:1 (a raw ValueError from deep inside HF): captioning,
    asking and both training loops name the image's size in one line instead."""
    strip, one_step = photo(2, 600, 0), myvlm.TrainingConfig(steps=1)
    calls = [
        lambda: vlm.caption([photo(32, 32, 1), strip]),
        lambda: vlm.ask(strip, "What is in the photo ?"),
        lambda: vlm.learn("strip", "Bobby", [strip], [["Bobby ."]], one_step, progress=False),
        lambda: vlm.learn("strip", "Bobby", [strip], [["Bobby ."]], one_step, progress=False, views_per_image=None),
    ]
    for call in calls:
        with pytest.raises(MyVLMError, match="cannot take a 2x600 image: absolute aspect ratio") as error:
            call()
        assert "\n" not in str(error.value)


def test_a_caption_job_records_a_refused_photo_and_captions_the_others(tmp_path):
    """One photo the processor refuses used to stop a whole library job (and every resume of it): its row now holds
    the reason, as for an unreadable file, and the photos of its batch are captioned as if it were not there."""
    from myvlm.cli import main

    model = str(BUILDERS["qwen2_vl"](tmp_path / "model", 0))
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(48, 32, 1).save(folder / "a.png")
    photo(8, 1700, 2).save(folder / "b.png")  # 212:1, past the processor's 200:1
    photo(32, 32, 3).save(folder / "c.png")
    out = tmp_path / "rows.jsonl"
    assert main(["caption", str(folder), "--model", model, "--library", str(tmp_path / "lib"), "--out", str(out)]) == 0
    rows = {row["image"].rsplit("/", 1)[-1]: row for row in map(json.loads, out.read_text().splitlines())}
    assert "cannot take a 8x1700 image: absolute aspect ratio" in rows["b.png"]["error"]
    alone = myvlm.load(model).caption([photo(48, 32, 1), photo(32, 32, 3)], max_new_tokens=40)
    assert [rows["a.png"]["caption"], rows["c.png"]["caption"]] == [c.text for c in alone]


def test_the_ray_stages_record_a_refused_photo_and_label_the_others(tmp_path):
    """The Ray engine's stages (run here as plain objects, the code its actors run) treat a refused photo as the local
    job does: the row's error names it, and the rest of the batch is captioned as if it were not there."""
    import numpy as np

    from myvlm.ray_engine import CaptionStage, DetectStage, read_photos

    model = str(BUILDERS["qwen2_vl"](tmp_path / "model", 0))
    paths = [tmp_path / name for name in ("a.png", "b.png", "c.png")]
    for path, (width, height, seed) in zip(paths, [(48, 32, 1), (8, 1700, 2), (32, 32, 3)], strict=True):
        photo(width, height, seed).save(path)
    batch = read_photos({"image": np.array([str(path) for path in paths], dtype=object)})
    threads = torch.get_num_threads()
    batch = DetectStage(str(tmp_path / "lib"), model, threads)(batch)
    rows = CaptionStage(str(tmp_path / "lib"), model, {}, 8, threads)(batch)
    assert list(rows["error"][[0, 2]]) == ["", ""]
    assert rows["error"][1].startswith(f"{paths[1]}: ") and "cannot take a 8x1700 image" in rows["error"][1]
    alone = myvlm.load(model).caption([photo(48, 32, 1), photo(32, 32, 3)], max_new_tokens=40)
    assert [json.loads(rows["labels"][i])["caption"] for i in (0, 2)] == [c.text for c in alone]


@pytest.mark.parametrize("halves", ["left-right", "top-bottom"])
def test_tower_patches_come_row_by_row_as_region_boxes_read_them(vlm, halves):
    """The processor flattens patches merge block by merge block and Qwen2.5-VL's tower returns them window by
    window: `tower_patches` puts them back row by row, so each patch's features sit where its box says (a photo
    half black, half white: every patch lies nearer the mean of its own half)."""
    picture = Image.new("RGB", (64, 64), "black")
    picture.paste(
        Image.new("RGB", (32, 64) if halves == "left-right" else (64, 32), "white"),
        (32, 0) if halves == "left-right" else (0, 32),
    )
    features = vlm.backend.tower_patches([picture])[0]
    side = int(features.shape[0] ** 0.5)
    grid = features.view(side, side, -1)
    white = torch.zeros(side, side, dtype=torch.bool)
    white[:, side // 2 :] = halves == "left-right"
    white[side // 2 :, :] |= halves == "top-bottom"
    nearer_white = (grid - grid[white].mean(0)).norm(dim=-1) < (grid - grid[~white].mean(0)).norm(dim=-1)
    assert torch.equal(nearer_white, white)


def language_model_inputs(vlm, batch, inserted) -> dict:
    """The deepstack inputs the language model gets in one forward over `batch` with `inserted` concepts."""
    seen = {}
    handle = vlm.backend.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    try:
        with torch.no_grad(), vlm.backend.inject(inserted, batch=batch):
            vlm.model(**vlm.backend.model_inputs(batch))
    finally:
        handle.remove()
    return {"mask": seen["visual_pos_masks"], "deepstack": seen["deepstack_visual_embeds"]}


def test_the_concept_slot_gets_a_zero_deepstack_row_and_the_image_keeps_its_own(qwen3):
    vlm = qwen3
    backend = vlm.backend
    image, prompt = photo(64, 48, 1), backend.prompt(CAPTION, ["Bobby"])
    plain = language_model_inputs(vlm, backend.encode([image], [prompt], [0]), vectors(vlm, [0]))
    batch = backend.encode([image], [prompt], [1])
    ours = language_model_inputs(vlm, batch, vectors(vlm, [1]))
    slot = batch.concept_positions[0][0]
    assert torch.equal(ours["mask"], batch.inputs["input_ids"] == backend.image_token_id) and ours["mask"][0, slot]
    assert len(ours["deepstack"]) == len(vlm.model.config.vision_config.deepstack_visual_indexes) == 2
    for with_concept, without in zip(ours["deepstack"], plain["deepstack"], strict=True):
        assert torch.equal(with_concept[:-1], without) and without.abs().sum() > 0  # the image's rows, unchanged
        assert not with_concept[-1].any()  # the concept's row (the image's last slot) is zero


def test_image_only_processor_and_the_tower_for_heads(qwen3):
    vlm = qwen3
    from transformers.utils import is_torchvision_available

    assert not is_torchvision_available()  # this machine: the image-only path is the one under test
    assert type(vlm.processor).__name__ == "Qwen3VLProcessor"
    assert getattr(vlm.processor, "video_processor", None) is None
    patches = vlm.backend.tower_patches([photo(32, 32, 7), photo(64, 48, 8)])
    assert patches.shape == (2, 64, vlm.backend.tower_width)  # 64x64 pixels in 8x8 patches, before merging
