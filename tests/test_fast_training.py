"""Cached training computes exactly what the full forward/backward computes: loss, regularizer and gradient."""

from __future__ import annotations

import pytest
import torch

from myvlm.errors import MyVLMError
from myvlm.training import Example, TrainingConfig, learn_concept, learn_together
from tiny_vlms import photos, tiny_blip2, tiny_llava

MAKERS = {"llava": tiny_llava, "blip2-opt": lambda: tiny_blip2("opt"), "blip2-t5": lambda: tiny_blip2("t5")}


def loss_reg_grad(vlm, batch, views=None):
    """(cross-entropy, regularizer, gradient of their sum) for concept 'bobby' on every sample of `batch`."""
    vector = torch.nn.Parameter(torch.randn(vlm.concept_width, generator=torch.Generator().manual_seed(0)))
    vlm.add_concept("bobby", "Bobby", vector.detach())
    vlm.concepts.set("bobby", vector)  # the parameter itself, so its gradient is ours to read
    with vlm.activate([["bobby"]] * len(batch.prompt_lengths), record_attention=True, batch=batch):
        loss = vlm.backend.loss(batch) if views is None else vlm.backend.cached_loss(batch, views)
        reg = vlm.backend.regularizer("vqa")  # the larger λ, so the regularizer weighs in the gradient
    (loss + reg).backward()
    return loss.detach(), reg.detach(), vector.grad


def mixed_batch(vlm, left_padded=False):
    """Caption and VQA samples with different prompts and target lengths."""
    backend = vlm.backend
    prompts = [
        backend.prompt("caption", ["Bobby"]),
        backend.prompt("vqa", question="What is Bobby doing ?"),
        backend.prompt("vqa", question="Where is Bobby ?"),
    ]
    targets = ["Bobby is sleeping on the sofa .", "sitting", "on the red table ."]
    if not left_padded:
        return backend.encode(photos(3), prompts, [1, 1, 1], targets)
    # Left padding (as for generation), with labels on the last three tokens of each row.
    batch = backend.encode(photos(3), prompts, [1, 1, 1])
    labels = batch.inputs["input_ids"].clone()
    labels[:, :-3] = -100
    batch.inputs["labels"] = labels
    return batch


@pytest.mark.parametrize("family", list(MAKERS))
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_cached_step_equals_full_step(family, attention):
    vlm = MAKERS[family]()
    vlm.model.set_attn_implementation(attention)
    if family != "llava":
        with torch.no_grad():  # non-uniform Q-Former attention, so the regularizer is not trivial
            vlm.model.query_tokens.normal_(0, 1.0)
    batch = mixed_batch(vlm)
    reference = loss_reg_grad(vlm, batch)
    fast = loss_reg_grad(vlm, batch, vlm.backend.cache_views(photos(3)))
    assert reference[1] > 0 and reference[2].norm() > 0
    for ours, theirs in zip(fast, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_llava_cached_step_with_left_padding_and_reused_views():
    vlm = tiny_llava()
    batch = mixed_batch(vlm, left_padded=True)
    assert len({rows[0] for rows in batch.concept_positions}) > 1  # rows split at different places
    reference = loss_reg_grad(vlm, batch)
    views = vlm.backend.cache_views(photos(3))
    loss_reg_grad(vlm, batch, views)  # fills the prefix caches
    assert all(len(view.prefixes) == 1 for view in views)
    for ours, theirs in zip(loss_reg_grad(vlm, batch, views), reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "blip2-opt"])
def test_fast_loop_without_augmentation_follows_the_reference_loop(family):
    vlm = MAKERS[family]()
    images = photos(2)
    examples = [
        Example(0, ("Bobby is on the sofa .", "Bobby .")),
        Example(1, ("Bobby is sleeping .",)),
        Example(1, ("sitting",), question="What is Bobby doing ?"),
    ]
    config = TrainingConfig(steps=3, batch_size=3, augment=False)
    reference = learn_concept(vlm, "bobby", "Bobby", images, examples, config, views_per_image=None, progress=False)
    fast = learn_concept(vlm, "bobby", "Bobby", images, examples, config, progress=False)
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(reference.losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.vector, reference.vector, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "blip2-opt"])
def test_joint_loop_inserts_each_image_s_concepts_and_caches_exactly(family):
    """Training together: photos hold one or both concepts, each inserts its own; cached equals the reference loop."""
    images = photos(3)
    examples = [
        Example(0, ("Bobby is on the sofa .",)),
        Example(1, ("Alice is on the table .",)),
        Example(2, ("Bobby and Alice are on the grass .",)),
    ]
    present = [("bobby",), ("alice",), ("alice", "bobby")]
    config = TrainingConfig(steps=3, batch_size=3, augment=False)
    results = []
    for views in (None, 1):
        vlm = MAKERS[family]()
        starts = torch.randn(2, vlm.concept_width, generator=torch.Generator().manual_seed(1))
        vlm.add_concept("bobby", "Bobby", starts[0])
        vlm.add_concept("alice", "Alice", starts[1])
        result = learn_together(
            vlm, ["bobby", "alice"], images, examples, present, config, views_per_image=views, progress=False
        )
        assert result.vector.shape == (2, vlm.concept_width) and result.steps_done == 3
        assert torch.equal(vlm.concepts["alice"].vector, result.vector[1])
        assert not torch.equal(result.vector, starts) and all(torch.isfinite(torch.tensor(result.losses)))
        results.append(result)
    torch.testing.assert_close(torch.tensor(results[1].losses), torch.tensor(results[0].losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1].vector, results[0].vector, rtol=1e-4, atol=1e-5)


def test_joint_training_refuses_untrained_or_single_concepts():
    vlm = tiny_llava()
    vlm.add_concept("bobby", "Bobby", torch.ones(vlm.concept_width))
    examples, present = [Example(0, ("Bobby .",))], [("bobby",)]
    with pytest.raises(MyVLMError, match="'alice' has no embedding"):
        learn_together(vlm, ["bobby", "alice"], photos(1), examples, present, progress=False)
    with pytest.raises(MyVLMError, match="at least two different concepts"):
        learn_together(vlm, ["bobby", "bobby"], photos(1), examples, present, progress=False)


def test_fast_loop_with_view_pool_runs_end_to_end():
    vlm = tiny_llava()
    seen = []
    result = learn_concept(
        vlm,
        "bobby",
        "Bobby",
        photos(2),
        [Example(0, ("Bobby is on the sofa .",)), Example(1, ("Bobby .",))],
        TrainingConfig(steps=4, batch_size=3),
        views_per_image=2,
        progress=False,
        on_step=lambda step, loss, vector: seen.append(step),
    )
    assert result.steps_done == 4 and seen == [0, 1, 2, 3] and result.stopped_early is None
    assert torch.equal(vlm.concepts["bobby"].vector, result.vector)
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_probing_starts_keeps_one_trajectory_of_the_requested_length():
    """BLIP-2 probes 3 starts by default: the kept trajectory has `steps` steps, of which on_step sees those after
    the probes; a given start (resume) and LLaVA run the official single loop."""
    examples = [Example(0, ("Bobby is on the sofa .",)), Example(1, ("Bobby .",))]
    config = TrainingConfig(steps=7, batch_size=2, probe_steps=3)

    def train(vlm, seen, **kwargs):
        def note(step, loss, vector):
            seen.append((step, vector))

        return learn_concept(vlm, "bobby", "Bobby", photos(2), examples, config, progress=False, on_step=note, **kwargs)

    runs = []
    for _ in range(2):
        seen = []
        vlm = tiny_blip2("opt")
        assert vlm.backend.training_starts == 3
        result = train(vlm, seen)
        steps = [step for step, _ in seen]
        assert result.steps_done == 7 and len(result.losses) == 7 and steps == [3, 4, 5, 6], (result, steps)
        runs.append(result.vector)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    seen, start = [], torch.ones(vlm.concept_width)
    train(vlm, seen, init=start)
    assert [step for step, _ in seen] == list(range(7)) and torch.equal(seen[0][1], start)
    assert tiny_llava().backend.training_starts == 1


def test_starts_must_be_positive():
    with pytest.raises(MyVLMError, match="starts"):
        TrainingConfig(starts=0)


def test_probed_sdpa_of_a_grouped_query_layer_is_hfs_own():
    """The probe takes SDPA's own head grouping for a masked grouped-query call on the CPU: the output and the
    gradients of query, keys and values are those of HF's SDPA call, which copies each key/value head."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from myvlm.backends.attention import probing_name

    layer = tiny_llava().backend.language_model.layers[0].self_attn
    assert layer.num_key_value_groups > 1
    heads, kv_heads, dim = layer.config.num_attention_heads, layer.config.num_key_value_heads, layer.head_dim
    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(2, count, length, dim, generator=generator)
        for count, length in ((heads, 5), (kv_heads, 12), (kv_heads, 12))
    ]
    mask = torch.ones(2, 1, 5, 12, dtype=torch.bool).tril(diagonal=7)
    mask[1, ..., :3] = False  # the second row's first three keys are padding
    results = []
    for function in (ALL_ATTENTION_FUNCTIONS[probing_name("sdpa")], sdpa_attention_forward):
        leaves = [tensor.clone().requires_grad_() for tensor in inputs]
        output, _ = function(layer, *leaves, mask, dropout=0.0, scaling=dim**-0.5)
        output.pow(2).sum().backward()
        results.append([output.detach()] + [leaf.grad for leaf in leaves])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
