"""PaliGemma and Gemma 3 specifics: inputs as their own processors make them, and the concept token inside the
image's bidirectional block (it changes the image tokens before it, never the text before the block)."""

from __future__ import annotations

import pytest
import torch

import myvlm
from families import full_and_cached_steps
from families.gemma import BUILDERS
from myvlm.toyworld import render_scene, sample_scene


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vlm(request, tmp_path_factory):
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param), 0)
    return myvlm.load(str(folder))


def photo(seed: int = 0):
    return render_scene(sample_scene(500 + seed))


def test_inputs_without_concepts_are_the_processors_own(vlm):
    """Token ids, token types and labels equal what the stock processor gives (PaliGemma: prompt + `suffix`)."""
    backend = vlm.backend
    prompt, answer = backend.prompt("caption", ["Bobby"]), "Bobby is on the left ."
    batch = backend.encode([photo()], [prompt], [0], [answer])
    if vlm.family == "paligemma":
        stock = backend.processor(images=[photo()], text=[prompt], suffix=[answer], return_tensors="pt")
        assert torch.equal(batch.inputs["labels"], stock["labels"])
        expected_end = backend.tokenizer.eos_token_id
    else:
        stock = backend.processor(images=[photo()], text=[prompt], add_special_tokens=False, return_tensors="pt")
        answer_ids = backend.tokenizer(answer, add_special_tokens=False).input_ids
        stock["input_ids"] = torch.cat([stock["input_ids"], torch.tensor([answer_ids])], dim=1)
        stock["token_type_ids"] = torch.cat([stock["token_type_ids"], torch.zeros(1, len(answer_ids), dtype=int)], 1)
        expected_end = backend.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        assert stock["input_ids"][0, 0] == backend.tokenizer.bos_token_id
        assert (stock["input_ids"][0] == backend.tokenizer.bos_token_id).sum() == 1  # the template's <bos> only
    ids = batch.inputs["input_ids"][0]
    assert ids[-1] == expected_end == backend.answer_end_id
    assert torch.equal(ids[:-1] if vlm.family == "gemma3" else ids, stock["input_ids"][0])
    types = batch.inputs["token_type_ids"][0]
    assert torch.equal(types[:-1] if vlm.family == "gemma3" else types, stock["token_type_ids"][0])
    assert torch.equal(batch.inputs["pixel_values"], stock["pixel_values"])


def test_the_concept_sits_inside_the_image_block_with_the_block_type(vlm):
    backend, tokenizer = vlm.backend, vlm.backend.tokenizer
    batch = backend.encode([photo()], [backend.prompt("caption", ["Bobby"])], [1], ["Bobby ."])
    ids, types = batch.inputs["input_ids"][0].tolist(), batch.inputs["token_type_ids"][0].tolist()
    (row,) = batch.concept_positions[0]
    assert ids[row] == backend.image_token_id == vlm.model.config.image_token_id
    following = tokenizer.convert_ids_to_tokens(ids[row + 1])
    if vlm.family == "gemma3":  # soft tokens are type 1; the processor's image token is <start_of_image>
        assert following == "<end_of_image>" and types[row] == 1
        assert backend.processor.image_token_id == tokenizer.convert_tokens_to_ids("<start_of_image>")
    else:  # the whole prompt is the type-0 prefix, the answer the type-1 suffix
        assert following == "<bos>" and types[row] == 0
        assert types == [0] * batch.prompt_lengths[0] + [1] * (len(ids) - batch.prompt_lengths[0])


def test_the_concept_changes_its_image_tokens_but_not_the_text_before_them(vlm):
    """Bidirectional block: the image tokens before the concept see it; tokens before the block do not."""
    backend = vlm.backend
    batch = backend.encode([photo()], [backend.prompt("caption", ["Bobby"])], [1], ["Bobby ."])
    states = []
    for seed in (0, 1):
        vector = torch.randn(vlm.concept_width, generator=torch.Generator().manual_seed(seed))
        vlm.add_concept("bobby", "Bobby", vector)
        with torch.no_grad(), vlm.activate([["bobby"]], batch=batch):
            states.append(vlm.model(**backend.model_inputs(batch), output_hidden_states=True).hidden_states[-1][0])
    ids = batch.inputs["input_ids"][0]
    image = (ids == backend.image_token_id).nonzero().flatten()
    first_image, concept = int(image[0]), batch.concept_positions[0][0]
    assert not torch.allclose(states[0][first_image:concept], states[1][first_image:concept])
    torch.testing.assert_close(states[0][:first_image], states[1][:first_image], rtol=0, atol=0)


def test_answers_are_causal(vlm):
    """Changing an answer's last word leaves the earlier positions alone (answers are not in the block)."""
    backend = vlm.backend
    prompt = backend.prompt("vqa", question="What is Bobby doing ?")
    logits = []
    for answer in ("sitting on the left", "sitting on the right"):
        batch = backend.encode([photo()], [prompt], [0], [answer])
        with torch.no_grad():
            logits.append(vlm.model(**backend.model_inputs(batch)).logits[0])
    torch.testing.assert_close(logits[0][:-2], logits[1][:-2], rtol=0, atol=0)


def test_vision_tower_patches_have_no_cls_token(vlm):
    patches = vlm.backend.tower_patches([photo(0), photo(1)])
    config = vlm.backend.vision_tower.config
    assert patches.shape == (2, (config.image_size // config.patch_size) ** 2, vlm.backend.tower_width)


def test_paligemma2_regularizer_and_cached_step_follow_softcapped_sliding_attention(tmp_path):
    """PaliGemma 2's Gemma 2 caps attention logits and alternates sliding-window layers: the probe's terms equal
    the eager attention weights, and the cached step equals the full one."""
    from families.gemma import build_paligemma

    vlm = myvlm.load(str(build_paligemma(tmp_path / "pg2", 0, text_model="gemma2")))
    assert vlm.model.config.text_config.attn_logit_softcapping
    vlm.model.set_attn_implementation("eager")
    backend = vlm.backend
    images = [photo(0), photo(1)]
    prompts = [backend.prompt("caption", ["Bobby"]), backend.prompt("vqa", question="Where is Bobby ?")]
    batch = backend.encode(images, prompts, [1, 1], ["Bobby is on the left of a red circle .", "on the left"])

    start = torch.randn(vlm.concept_width, generator=torch.Generator().manual_seed(3))
    full, cached = full_and_cached_steps(vlm, images, batch, "caption", start)
    for ours, theirs in zip(cached, full, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_gemma3_cached_step_equals_the_full_one_when_the_text_before_the_image_outgrows_the_sliding_window(tmp_path):
    """A sliding-window layer's own cache keeps only its window: the cached prefix must keep every key, as the full
    forward sees them (here the window, 2, is shorter than the text before the image block)."""
    import json

    from families.gemma import build_gemma3

    folder = build_gemma3(tmp_path / "gemma3", 0)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["sliding_window"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    vlm = myvlm.load(str(folder))
    backend = vlm.backend
    images = [photo(0), photo(1)]
    prompts = [backend.prompt("caption", ["Bobby"]), backend.prompt("vqa", question="Where is Bobby ?")]
    batch = backend.encode(images, prompts, [1, 1], ["Bobby is on the left .", "on the left"])
    assert min(row.index(backend.image_token_id) for row in batch.inputs["input_ids"].tolist()) > 2

    def step(views=None):
        v = torch.nn.Parameter(torch.randn(vlm.concept_width, generator=torch.Generator().manual_seed(3)))
        vlm.add_concept("bobby", "Bobby", v.detach())
        vlm.concepts.set("bobby", v)
        with vlm.activate([["bobby"]] * 2, record_attention=True, batch=batch):
            loss = backend.loss(batch) if views is None else backend.cached_loss(batch, views)
            reg = backend.regularizer("caption")
        (loss + reg).backward()
        return loss.detach(), reg.detach(), v.grad

    full = step()
    for ours, theirs in zip(step(backend.cache_views(images)), full, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_gemma3_folder_without_chat_template_is_one_clear_error(tmp_path):
    from families.gemma import build_gemma3

    folder = build_gemma3(tmp_path / "gemma3", 0)
    (folder / "chat_template.jinja").unlink()
    vlm = myvlm.load(str(folder))
    with pytest.raises(myvlm.MyVLMError, match="gemma3 model folder has no chat template"):
        vlm.caption([photo(0)], [[]], max_new_tokens=2)
