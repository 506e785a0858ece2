"""The same matrix for every VLM family, on tiny random models of the real transformers classes saved with their real
processor classes (tests/families/*.py) and loaded through the public `myvlm.load`: gating, the regularizer,
several concepts, mixed batches, cached training, storage, errors, the learning proof and the CLI."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import myvlm
from families import builders, full_and_cached_steps, pretrain_on_toyworld, pretraining_names
from myvlm import ConceptLibrary, MyVLMError
from myvlm.backends import backend_for
from myvlm.cli import main
from myvlm.toyworld import concept_data, render_scene, sample_scene

BUILDERS = builders()


@pytest.fixture(scope="session", params=sorted(BUILDERS))
def family(request, tmp_path_factory):
    """(model_type, model folder, dynamic resolution)."""
    build, dynamic = BUILDERS[request.param]
    return request.param, build(tmp_path_factory.mktemp(request.param), 0), dynamic


def load(family) -> myvlm.PersonalizedVLM:
    return myvlm.load(str(family[1]))


def scenes(n: int, seed: int = 0, sizes: bool = False) -> list:
    """Toy-world photos; with `sizes`, every other one in another shape (dynamic-resolution families)."""
    images = [render_scene(sample_scene(1000 + seed * 100 + i)) for i in range(n)]
    return [im.resize((96, 64)) if sizes and i % 2 else im for i, im in enumerate(images)]


def vector(vlm, seed: int) -> torch.Tensor:
    return torch.randn(vlm.concept_width, generator=torch.Generator().manual_seed(seed))


def test_loads_through_the_public_api_with_its_family_backend(family):
    vlm = load(family)
    assert vlm.model.config.model_type == family[0]
    assert type(vlm.backend) is backend_for(family[0])
    assert vlm.concept_width == vlm.model.config.get_text_config().hidden_size


def test_a_folder_without_its_tokenizer_files_is_one_clear_error(family, tmp_path):
    """Some tokenizer classes load an empty vocabulary where the files are gone; the folder must not load silently."""
    folder = shutil.copytree(family[1], tmp_path / "copy")
    for path in folder.iterdir():
        if path.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            path.unlink()
    with pytest.raises(MyVLMError, match="cannot load model") as error:
        myvlm.load(str(folder))
    assert "\n" not in str(error.value)


def test_gating_is_bit_exact_when_no_concept_fires(family):
    vlm = load(family)
    untouched = type(vlm.model).from_pretrained(str(family[1])).eval()  # never hooked
    vlm.add_concept("bobby", "Bobby", vector(vlm, 0))
    images = scenes(3, sizes=family[2])
    batch = vlm.backend.encode(images, [vlm.backend.prompt("caption")] * 3, [0, 0, 0])
    with vlm.activate([[], [], []]):
        personalized = vlm.model(**batch.inputs).logits
        personalized_ids = vlm.model.generate(**batch.inputs, max_new_tokens=6, do_sample=False)
    plain = untouched(**batch.inputs).logits
    plain_ids = untouched.generate(**batch.inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(personalized, plain)
    assert torch.equal(personalized_ids, plain_ids)
    texts = [c.text for c in vlm.caption(images, max_new_tokens=6)]
    prompt_length = batch.inputs["input_ids"].shape[1]
    expected = vlm.backend.tokenizer.batch_decode(plain_ids[:, prompt_length:], skip_special_tokens=True)
    assert texts == [t.strip() for t in expected]


def test_generation_stops_at_the_answer_end_even_where_the_generation_config_does_not(family):
    """Training ends every answer with `answer_end_id` (a chat family's end of turn); a model folder whose generation
    config stops only at EOS must still stop there rather than run on into a made-up next turn."""
    vlm = load(family)
    end = vlm.backend.answer_end_id
    stops = vlm.model.generation_config.eos_token_id
    stops = [stops] if isinstance(stops, int) else list(stops)
    vlm.model.generation_config.eos_token_id = [i for i in stops if i != end] or [vlm.backend.tokenizer.pad_token_id]
    head = vlm.model.get_output_embeddings()
    says_end = torch.nn.Linear(head.in_features, head.out_features, bias=True)  # every step's argmax is the end
    torch.nn.init.zeros_(says_end.weight)
    with torch.no_grad():
        says_end.bias.copy_(torch.nn.functional.one_hot(torch.tensor(end), head.out_features).float())
    vlm.model.set_output_embeddings(says_end)
    generated = []
    generate = vlm.model.generate
    vlm.model.generate = lambda **kwargs: generated.append(generate(**kwargs)) or generated[-1]
    batch = vlm.backend.encode(scenes(1), [vlm.backend.prompt("caption")], [0])
    assert vlm.backend.generate(batch, max_new_tokens=5) == [""]
    new_tokens = (
        generated[0][0, batch.inputs["input_ids"].shape[1] :]
        if vlm.backend.generation_includes_prompt
        else generated[0][0]
    )
    assert new_tokens.tolist()[-1] == end and len(new_tokens) <= 2  # (a decoder start token may lead)


def test_regularizer_equals_hand_computation_from_eager_attention(family):
    vlm = load(family)
    vlm.model.set_attn_implementation("eager")
    vlm.add_concept("alice", "Alice", vector(vlm, 1))
    vlm.add_concept("bobby", "Bobby", vector(vlm, 2))
    prompts = [vlm.backend.prompt("caption", ["Alice", "Bobby"]), vlm.backend.prompt("caption", ["Bobby"])]
    targets = ["Alice and Bobby are on the left .", "Bobby ."]
    batch = vlm.backend.encode(scenes(2, sizes=family[2]), prompts, [2, 1], targets)
    with vlm.activate([["alice", "bobby"], ["bobby"]], record_attention=True, batch=batch):
        outputs = vlm.model(**batch.inputs, output_attentions=True)
        ours = vlm.backend.regularizer("caption")
    lam = vlm.backend.reg_lambda["caption"]
    hand = sum(
        lam * (layer[b, :, pos, :] ** 2).mean()
        for layer in outputs.attentions
        for b, positions in enumerate(batch.concept_positions)
        for pos in positions
    )
    assert len(outputs.attentions) == vlm.model.config.get_text_config().num_hidden_layers
    assert ours.item() > 0
    torch.testing.assert_close(ours, hand, rtol=1e-5, atol=1e-9)


def test_two_concepts_in_one_image_enter_once_each_in_name_order(family):
    vlm = load(family)
    vectors = {"bobby": vector(vlm, 5), "alice": vector(vlm, 6)}
    for name, v in vectors.items():
        vlm.add_concept(name, name.title(), v)
    captured = {}
    vlm.backend.language_model.register_forward_pre_hook(
        lambda m, a, kw: None if "embeds" in captured else captured.update(embeds=kw["inputs_embeds"]),
        with_kwargs=True,
    )
    batch = vlm.backend.encode(scenes(1), [vlm.backend.prompt("caption", ["Alice", "Bobby"])], [2])
    with vlm.activate([["bobby", "alice", "bobby"]]):
        vlm.model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
    ids = batch.inputs["input_ids"][0]
    rows = batch.concept_positions[0]
    assert len(rows) == 2 and all(ids[r] == vlm.backend.image_token_id for r in rows)
    embeds = captured["embeds"][0]
    image_rows = [i for i in (ids == vlm.backend.image_token_id).nonzero().flatten().tolist() if i not in rows]
    scale = embeds[image_rows].norm(dim=-1).mean()
    for row, name in zip(rows, ["alice", "bobby"], strict=True):
        expected = vectors[name] / vectors[name].norm() * scale
        torch.testing.assert_close(embeds[row], expected.to(embeds.dtype), rtol=1e-4, atol=1e-5)


def test_a_batch_with_different_concept_counts_and_sizes_equals_each_sample_alone(family):
    vlm = load(family)
    vlm.add_concept("alice", "Alice", vector(vlm, 7))
    vlm.add_concept("bobby", "Bobby", vector(vlm, 8))
    images = scenes(3, seed=1, sizes=family[2])
    names = [["alice", "bobby"], [], ["bobby"]]
    prompts = [vlm.backend.prompt("caption", [n.title() for n in ns]) for ns in names]
    targets = ["Alice and Bobby are here .", "a red circle .", "Bobby is on the left ."]

    def logits(indices):
        batch = vlm.backend.encode(
            [images[i] for i in indices],
            [prompts[i] for i in indices],
            [len(names[i]) for i in indices],
            [targets[i] for i in indices],
        )
        with torch.no_grad(), vlm.activate([names[i] for i in indices], batch=batch):
            out = vlm.model(**vlm.backend.model_inputs(batch)).logits
        mask = batch.inputs["attention_mask"].bool()
        return [out[b][mask[b]] for b in range(len(indices))]  # right-padded: real tokens only

    together = logits([0, 1, 2])
    for i in range(3):
        torch.testing.assert_close(together[i], logits([i])[0], rtol=1e-4, atol=1e-4)
    batched = [c.text for c in vlm.caption(images, names, batch_size=3, max_new_tokens=6)]
    alone = [vlm.caption([images[i]], [names[i]], max_new_tokens=6)[0].text for i in range(3)]
    assert batched == alone


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_cached_training_step_equals_the_full_step(family, attention):
    vlm = load(family)
    vlm.model.set_attn_implementation(attention)
    backend = vlm.backend
    images = scenes(3, seed=2, sizes=family[2])
    prompts = [
        backend.prompt("caption", ["Bobby"]),
        backend.prompt("vqa", question="What is Bobby doing ?"),
        backend.prompt("vqa", question="Where is Bobby ?"),
    ]
    batch = backend.encode(images, prompts, [1, 1, 1], ["Bobby is on the left .", "sitting", "on the right ."])
    reference, fast = full_and_cached_steps(vlm, images, batch, "vqa", vector(vlm, 0))
    assert reference[1] > 0 and reference[2].norm() > 0
    for ours, theirs in zip(fast, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_text_holding_the_image_placeholder_is_one_clear_error(family):
    """The processor would find one image placeholder more than there are images (a raw ValueError from HF, or a
    token-feature mismatch deep in the model): a question, caption or identifier holding it is refused in one line."""
    vlm = load(family)
    token = vlm.processor.image_token
    image, one_step = scenes(1)[0], myvlm.TrainingConfig(steps=1, batch_size=1)
    calls = [
        lambda: vlm.ask(image, f"What is {token} here ?"),
        lambda: vlm.learn("bobby", "Bobby", [image], [[f"Bobby {token} is on the left ."]], one_step, progress=False),
        lambda: vlm.learn("bobby", token, [image], [[f"{token} is on the left ."]], one_step, progress=False),
    ]
    for call in calls:
        with pytest.raises(MyVLMError, match=f"special token '{re.escape(token)}'") as error:
            call()
        assert "\n" not in str(error.value)


def test_embedding_round_trip_and_width_mismatch(family, tmp_path):
    vlm = load(family)
    library = ConceptLibrary(tmp_path / "library")
    library.create("Bobby", kind="object", class_word="dog")
    v = vector(vlm, 9)
    library.save_embedding("Bobby", vlm.model_id, v, family=vlm.family, task="caption")
    vlm.add_concept("Bobby", "Bobby", v)
    images = scenes(2)
    before = [c.text for c in vlm.caption(images, [["Bobby"], []], max_new_tokens=5)]
    again = load(family)
    assert again.use_library(ConceptLibrary(tmp_path / "library")) == ["Bobby"]
    assert [c.text for c in again.caption(images, [["Bobby"], []], max_new_tokens=5)] == before
    with pytest.raises(MyVLMError, match="width 7 does not match"):
        vlm.add_concept("alice", "Alice", torch.randn(7))
    library.create("alice", kind="person")
    library.save_embedding("alice", vlm.model_id, torch.randn(7))
    with pytest.raises(MyVLMError, match="width 7, the model needs"):
        library.load_embedding("alice", vlm.model_id, vlm.concept_width)


def test_learned_concept_is_named_exactly_when_switched_on(family):
    """After toy-world pretraining (the family's tiny model as the toy models are made) and 100 steps on 4 photos,
    the concept is named on its photos exactly when it is switched on. A toy number: plumbing, not real quality. What
    it shows is the injection path end to end (the concept reaches the model, which reads it, and nothing leaks when
    it is off); it does not show that training moved the vector: benchmarks/learning_seeds.py finds the untrained
    starting vector named on the same photos, and on other seeds some fixtures name nothing either way."""
    vlm = pretrain_on_toyworld(load(family), names=pretraining_names(family[0]))
    data = concept_data(n_concepts=1, seed=0)[0]
    identifier = data.concept.identifier
    images = [example.image for example in data.train]
    result = vlm.learn(identifier, identifier, images, [[example.caption] for example in data.train], progress=False)
    assert result.steps_done == 100
    views = images + [example.image for example in data.positives[:4]]
    on = [c.text for c in vlm.caption(views, [[identifier]] * len(views), max_new_tokens=24)]
    off = [c.text for c in vlm.caption(views, [[]] * len(views), max_new_tokens=24)]
    assert sum(identifier in text for text in on) >= len(views) - 1, on
    assert not any(identifier in text for text in off), off


def test_cli_trains_captions_asks_and_evaluates(family, tmp_path, capsys):
    model = str(family[1])
    library = str(tmp_path / "lib")
    ConceptLibrary(library).create("Bobby", kind="object", class_word="circle")
    folder = tmp_path / "bobby"
    folder.mkdir()
    for index, image in enumerate(scenes(4, seed=3)):
        image.save(folder / f"{index}.png")
    (folder / "captions.json").write_text(json.dumps({f"{i}.png": ["Bobby is on the left ."] for i in range(4)}))
    common = ["--model", model, "--library", library]
    assert main(["train", "Bobby", "--captions", str(folder / "captions.json"), "--steps", "3", *common]) == 0
    assert ConceptLibrary(library).get("Bobby").embeddings[str(family[1].resolve())]["steps"] == 3
    out = tmp_path / "captions.json"
    assert main(["caption", str(folder), "--json", str(out), *common]) == 0
    assert len(json.loads(out.read_text())) == 4
    capsys.readouterr()
    assert main(["ask", str(folder / "0.png"), "What is Bobby doing ?", *common]) == 0
    assert capsys.readouterr().out.strip()
    metrics = tmp_path / "metrics.json"
    args = ["eval", "--concept", "Bobby", "--positives", str(folder), "--negatives", str(folder), *common]
    assert main([*args, "--json", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["n_pos"] == 4
