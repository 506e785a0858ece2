"""Core MyVLM mechanics on tiny random-weight models of the real transformers classes."""

from __future__ import annotations

import copy

import pytest
import torch

from myvlm import ConceptLibrary, MyVLMError, load_official_embedding
from myvlm.model import PersonalizedVLM
from tiny_vlms import photos, tiny_blip2, tiny_llava

MAKERS = {"llava": tiny_llava, "blip2-opt": lambda: tiny_blip2("opt"), "blip2-t5": lambda: tiny_blip2("t5")}


@pytest.fixture(params=list(MAKERS))
def vlm(request) -> PersonalizedVLM:
    return MAKERS[request.param]()


def forward_inputs(vlm: PersonalizedVLM, batch) -> dict:
    """Encoder-decoder LMs (Flan-T5) need a decoder start for a plain forward pass."""
    inputs = dict(batch.inputs)
    if not vlm.backend.generation_includes_prompt:
        inputs["decoder_input_ids"] = torch.zeros(len(inputs["input_ids"]), 1, dtype=torch.long)
    return inputs


def random_vector(vlm: PersonalizedVLM, seed: int) -> torch.Tensor:
    return torch.randn(vlm.concept_width, generator=torch.Generator().manual_seed(seed))


def test_gating_is_bit_exact_when_no_concept_fires(vlm):
    untouched = copy.deepcopy(vlm.model)
    vlm.backend.remove_hooks()
    vlm.backend.model = vlm.model  # deepcopy copied the hooks' bound model; re-register on the original
    vlm.backend._register_hooks()
    vlm.add_concept("bobby", "Bobby", random_vector(vlm, 0))
    images = photos(3)
    prompts = [vlm.backend.prompt("caption")] * 3
    batch = vlm.backend.encode(images, prompts, [0, 0, 0])
    with vlm.activate([[], [], []]):
        personalized = vlm.model(**forward_inputs(vlm, batch)).logits
        personalized_ids = vlm.model.generate(**batch.inputs, max_new_tokens=6, do_sample=False)
    plain = untouched(**forward_inputs(vlm, batch)).logits
    plain_ids = untouched.generate(**batch.inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(personalized, plain)
    assert torch.equal(personalized_ids, plain_ids)
    # The high-level API on images where no concept is detected gives the untouched captions too.
    texts = [c.text for c in vlm.caption(images, max_new_tokens=6)]
    expected = vlm.backend.tokenizer.batch_decode(
        plain_ids[:, batch.inputs["input_ids"].shape[1] :] if vlm.backend.generation_includes_prompt else plain_ids,
        skip_special_tokens=True,
    )
    assert texts == [t.strip() for t in expected]


def test_concept_changes_outputs_only_of_images_that_have_it(vlm):
    vlm.add_concept("bobby", "Bobby", random_vector(vlm, 1))
    images = photos(2)
    prompts = [vlm.backend.prompt("caption")] * 2
    plain = vlm.model(**forward_inputs(vlm, vlm.backend.encode(images, prompts, [0, 0]))).logits
    with vlm.activate([["bobby"], []]):
        mixed = vlm.model(**forward_inputs(vlm, vlm.backend.encode(images, prompts, [1, 0]))).logits
    assert not torch.allclose(mixed[0, -1], plain[0, -1])
    torch.testing.assert_close(mixed[1, -1], plain[1, -1], rtol=1e-4, atol=1e-5)


def test_llava_regularizer_equals_hand_computation_from_eager_attention():
    vlm = tiny_llava()
    vlm.model.set_attn_implementation("eager")
    vlm.add_concept("bobby", "Bobby", random_vector(vlm, 2))
    prompts = [vlm.backend.prompt("caption", ["Bobby"])] * 2
    batch = vlm.backend.encode(photos(2), prompts, [1, 1], ["Bobby is on the sofa .", "Bobby ."])
    with vlm.activate([["bobby"], ["bobby"]], record_attention=True, batch=batch):
        outputs = vlm.model(**batch.inputs, output_attentions=True)
        ours = vlm.backend.regularizer("caption")
    lam = vlm.backend.reg_lambda["caption"]
    hand = sum(
        lam * (layer[b, :, pos, :] ** 2).mean()
        for layer in outputs.attentions
        for b, positions in enumerate(batch.concept_positions)
        for pos in positions
    )
    assert ours.item() > 0
    torch.testing.assert_close(ours, hand, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("language_model", ["opt", "t5"])
def test_blip2_regularizer_equals_hand_computation_from_eager_attention(language_model):
    vlm = tiny_blip2(language_model)
    vlm.model.set_attn_implementation("eager")
    with torch.no_grad():  # non-uniform attention, so the check is not trivially 1/(n+1)
        vlm.model.query_tokens.normal_(0, 1.0)
    vlm.add_concept("bobby", "Bobby", random_vector(vlm, 3))
    vlm.add_concept("alice", "Alice", random_vector(vlm, 4))
    probabilities = []
    for layer in vlm.model.qformer.encoder.layer:
        if layer.has_cross_attention:
            layer.crossattention.attention.register_forward_hook(lambda m, a, out: probabilities.append(out[1]))
    batch = vlm.backend.encode(photos(2), ["", ""], [2, 1], ["Bobby and Alice .", "Bobby ."])
    with vlm.activate([["bobby", "alice"], ["bobby"]], record_attention=True, batch=batch):
        vlm.model(**batch.inputs)
        ours = vlm.backend.regularizer("caption")
    n_image = vlm.model.config.vision_config.image_size // vlm.model.config.vision_config.patch_size
    n_image = n_image**2 + 1
    hand = 0.0
    for probs in probabilities:  # [B, H, Q, n_image + 2]; sample 1's second slot is padding
        used = torch.cat([probs[0, :, :, n_image:].flatten(), probs[1, :, :, n_image : n_image + 1].flatten()])
        assert torch.all(probs[1, :, :, n_image + 1] == 0)
        hand = hand + 0.04 * (used**2).mean()
    assert ours.item() > 0
    torch.testing.assert_close(ours, hand, rtol=1e-5, atol=1e-9)


def test_two_concepts_in_one_image_enter_once_each_in_name_order():
    vlm = tiny_llava()
    vectors = {"bobby": random_vector(vlm, 5), "alice": random_vector(vlm, 6)}
    for name, vector in vectors.items():
        vlm.add_concept(name, name.title(), vector)
    captured = {}
    vlm.model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: captured.update(embeds=kw["inputs_embeds"]), with_kwargs=True
    )
    image_token = vlm.model.config.image_token_id
    batch = vlm.backend.encode(photos(1), [vlm.backend.prompt("caption", ["Alice", "Bobby"])], [2])
    with vlm.activate([["bobby", "alice", "bobby"]]):
        vlm.model(**batch.inputs)
    ids = batch.inputs["input_ids"][0]
    n_image = vlm.processor.image_processor.crop_size["height"] // vlm.processor.patch_size
    assert (ids == image_token).sum() == n_image**2 + 2
    embeds = captured["embeds"][0]
    image_rows = embeds[(ids == image_token).nonzero().flatten()]
    scale = image_rows[:-2].norm(dim=-1).mean()
    for row, name in zip(batch.concept_positions[0], ["alice", "bobby"], strict=True):
        expected = vectors[name] / vectors[name].norm() * scale
        torch.testing.assert_close(embeds[row], expected, rtol=1e-5, atol=1e-5)


def test_blip2_two_concepts_enter_the_qformer_once_each():
    vlm = tiny_blip2("opt")
    vectors = {"bobby": random_vector(vlm, 7), "alice": random_vector(vlm, 8)}
    for name, vector in vectors.items():
        vlm.add_concept(name, name.title(), vector)
    captured = {}
    vlm.model.qformer.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    batch = vlm.backend.encode(photos(1), [""], [2])
    with vlm.activate([["bobby", "alice", "alice"]]):
        vlm.model.generate(**batch.inputs, max_new_tokens=2)
    states = captured["encoder_hidden_states"][0]
    assert captured["encoder_attention_mask"].shape[-1] == states.shape[0]
    final_norm = vlm.model.vision_model.post_layernorm
    torch.testing.assert_close(states[-2], final_norm(vectors["alice"] / vectors["alice"].norm()))
    torch.testing.assert_close(states[-1], final_norm(vectors["bobby"] / vectors["bobby"].norm()))


def test_save_load_round_trip_gives_identical_outputs(vlm, tmp_path):
    library = ConceptLibrary(tmp_path / "library")
    library.create("Bobby", kind="object", class_word="dog")
    vector = random_vector(vlm, 9)
    library.save_embedding("Bobby", vlm.model_id, vector, family=vlm.family, task="caption")
    vlm.add_concept("Bobby", "Bobby", vector)
    images = photos(2)
    before = [c.text for c in vlm.caption(images, [["Bobby"], []], max_new_tokens=5)]
    reloaded = ConceptLibrary(tmp_path / "library").load_embedding("Bobby", vlm.model_id, vlm.concept_width)
    assert torch.equal(reloaded, vector)
    vlm.remove_concept("Bobby")
    vlm.add_concept("Bobby", "Bobby", reloaded)
    assert [c.text for c in vlm.caption(images, [["Bobby"], []], max_new_tokens=5)] == before
    # The manifest says which models the concept has embeddings for, with their width.
    assert library.get("Bobby").embeddings[vlm.model_id]["width"] == vlm.concept_width


def test_official_checkpoint_imports_and_width_mismatch_errors(vlm, tmp_path):
    values = torch.randn(1, vlm.concept_width)
    path = tmp_path / "concept_embeddings_llava_captioning.pt"
    torch.save(
        {49: {"keys": torch.randn(4, 512), "values": values * 0}, 99: {"keys": torch.randn(4, 512), "values": values}},
        path,
    )
    vector, info = load_official_embedding(path)
    assert torch.equal(vector, values[0])
    assert info == {"source": "official", "step": 99, "official_vlm": "llava", "task": "caption"}
    vlm.add_concept("bobby", "Bobby", vector)
    with pytest.raises(MyVLMError, match="width 7 does not match"):
        vlm.add_concept("alice", "Alice", torch.randn(7))
    library = ConceptLibrary(tmp_path / "library")
    library.create("alice", kind="person")
    library.save_embedding("alice", vlm.model_id, torch.randn(7))
    with pytest.raises(MyVLMError, match="width 7, the model needs"):
        library.load_embedding("alice", vlm.model_id, vlm.concept_width)


def test_official_import_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "concept_embeddings_blip-2_captioning.pt"
    torch.save({99: {"keys": Evil(), "values": torch.zeros(1, 4)}}, path)
    with pytest.raises(MyVLMError, match="not a loadable MyVLM checkpoint"):
        load_official_embedding(path)
