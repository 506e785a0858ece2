"""End to end with the CLI alone, on `myvlm toyworld export` data and both toy models: add two concepts, train both,
caption a folder mix holding one, the other, both or neither, and ask about them. Captions must name exactly the
concepts each scene graph holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from myvlm.cli import main
from myvlm.model import TOY_MODELS
from myvlm.toyworld import render_scene, sample_scene
from myvlm.toyworld.world import SceneObject, horizontal_position
from myvlm.training import word_pattern


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
        negatives = ["--negatives", str(exported / "negatives"), str(folder / "hard_negatives")]
        assert main([*add, *negatives, "--encoder", f"vision-tower:{model}"]) == 0
        train = ["train", name, "--model", model, "--captions", str(folder / "captions.json"), "--library", library]
        assert main(train) == 0
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
    wrong = []
    for row in rows:
        expected = present(Path(row["image"]))
        named = {c for c in concepts if word_pattern(c).search(row["caption"])}
        if set(row["concepts"]) != expected or named != expected:
            wrong.append((row["image"], sorted(expected), row["concepts"], row["caption"]))
    assert not wrong, f"{len(wrong)}/{len(rows)} captions name the wrong concepts: {wrong[:3]}"

    if model == "toy-llava":  # pretrained on VQA: answers are checked against the scene graph
        correct = 0
        positives = sorted((exported / concepts[0] / "positives").glob("*.png"))[:5]
        for path in positives:
            capsys.readouterr()
            question = f"Where is {concepts[0]} in the image?"
            assert main(["ask", str(path), question, "--model", model, "--library", library]) == 0
            graph = graphs[f"{concepts[0]}/positives/{path.name}"]
            obj = next(o for o in graph["objects"] if o["concept"] == concepts[0])
            correct += capsys.readouterr().out.strip() == horizontal_position(SceneObject(**obj))
        assert correct >= 4, f"{correct}/5 position answers right"
