"""End to end with the CLI alone, on `myvlm toyworld export` data and both toy models: add two concepts, train each
alone and then both together, caption a folder mix holding one, the other, both or neither, and ask about them.
Captions must name exactly the concepts each scene graph holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from myvlm.cli import main
from myvlm.library import ConceptLibrary
from myvlm.model import TOY_MODELS
from myvlm.text import word_pattern
from myvlm.toyworld import HEAD_ENCODER, render_scene, sample_scene
from myvlm.toyworld.world import NUMBER_WORDS, POSITIONS, SceneObject, horizontal_position


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    data = tmp_path_factory.mktemp("toyworld")
    assert main(["toyworld", "export", "--out", str(data), "--concepts", "2", "--seed", "0"]) == 0
    neither = data / "neither"
    neither.mkdir()
    for i in range(8):  # scenes no head saw in training
        render_scene(sample_scene((1 << 44) + i)).save(neither / f"scene_{i}.png")
    return data


@pytest.mark.parametrize("model", TOY_MODELS)
def test_two_concepts_train_caption_ask(model, exported, tmp_path, capsys):
    library = str(tmp_path / "library")
    concepts = [c["identifier"] for c in json.loads((exported / "concepts.json").read_text())["concepts"]]
    for name in concepts:
        folder = exported / name
        add = ["concept", "add", name, "--kind", "object", "--images", str(folder), "--library", library]
        others = [str(exported / c) for c in concepts if c != name]  # the other concept's photos are negatives too
        negatives = ["--negatives", str(exported / "negatives"), str(folder / "hard_negatives"), *others]
        assert main([*add, *negatives, "--encoder", HEAD_ENCODER]) == 0
        train = ["train", name, "--model", model, "--captions", str(folder / "captions.json"), "--library", library]
        assert main(train) == 0
    # Photos of both together (plus each alone) teach the two vectors to stay apart when inserted together.
    captions = [str(exported / folder / "captions.json") for folder in ("together", *concepts)]
    capsys.readouterr()
    assert main(["train", *concepts, "--model", model, "--captions", *captions, "--library", library]) == 0
    trained_together = capsys.readouterr().out
    stored = ConceptLibrary(library).get(concepts[0]).embeddings[model]
    if model == "toy-blip2":  # alone, its two vectors read as one name, or a third one
        assert f"trained {' + '.join(concepts)} together" in trained_together, trained_together
        assert stored["together"]["with"] == concepts[1:], stored
    graphs = json.loads((exported / "scene_graphs.json").read_text())

    def present(path) -> set[str]:
        key = f"{path.parent.name}/{path.name}"
        if path.parent.name == "positives":
            key = f"{path.parent.parent.name}/positives/{path.name}"
        graph = graphs.get(key)
        return {o["concept"] for o in graph["objects"] if o["concept"]} if graph else set()

    folders = [exported / "two_concepts", *(exported / c / "positives" for c in concepts), exported / "neither"]
    out = tmp_path / "captions.json"
    assert main(["caption", *map(str, folders), "--model", model, "--json", str(out), "--library", library]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 10 + 2 * 20 + 8
    heads_right, named_as_detected = {}, {}  # per number of concepts in the scene
    for row in rows:
        expected = present(Path(row["image"]))
        named = {c for c in concepts if word_pattern(c).search(row["caption"])}
        heads_right.setdefault(len(expected), []).append(set(row["concepts"]) == expected)
        named_as_detected.setdefault(len(row["concepts"]), []).append(named == set(row["concepts"]))
    heads_rate = {k: sum(v) / len(v) for k, v in heads_right.items()}
    naming_rate = {k: sum(v) / len(v) for k, v in named_as_detected.items()}
    # Measured (issue #5 asks for 1.0 everywhere):
    #   toy-llava heads 1.00 / 1.00 / 1.00 (no / one / two concepts); captions name the detected 1.00 / 1.00 / 1.00
    #   (its vectors trained alone already name both on all 8 photos together, so it keeps them);
    #   toy-blip2 heads 1.00 / 1.00 / 1.00 (the same toy-CLIP heads); captions name it 1.00 / 1.00 / 1.00 (trained
    #   alone only: 0.00, it names one of the two or a third name).
    assert min(heads_rate.values()) >= 0.95, heads_rate
    assert naming_rate[0] == 1.0 and naming_rate[1] >= 0.9 and naming_rate[2] >= 0.8, naming_rate

    # Both toy models are pretrained on VQA: answers are checked against the scene graph.
    placed = counted = 0
    positives = sorted((exported / concepts[0] / "positives").glob("*.png"))[:10]
    for path in positives:
        graph = graphs[f"{concepts[0]}/positives/{path.name}"]
        concept = next(SceneObject(**o) for o in graph["objects"] if o["concept"] == concepts[0])
        capsys.readouterr()
        question = f"Where is {concepts[0]} in the image?"
        assert main(["ask", str(path), question, "--model", model, "--library", library]) == 0
        answer = capsys.readouterr().out.strip()
        assert answer in POSITIONS, answer
        placed += answer == horizontal_position(concept)
        assert main(["ask", str(path), "How many objects are there?", "--model", model, "--library", library]) == 0
        counted += capsys.readouterr().out.strip() == NUMBER_WORDS[len(graph["objects"])]
    print(model, "heads right:", heads_rate, "captions name exactly the detected concepts:", naming_rate)
    print(model, f"ask: {placed}/10 positions, {counted}/10 counts right")
    # Measured: toy-llava 8/10 positions (chance: about 3) and 7/10 counts; toy-blip2 3/10 and 9/10 (RESULTS.md).
    assert counted >= 5, f"{counted}/10 object counts right"
    if model == "toy-llava":
        assert placed >= 5, f"{placed}/10 positions right"
