"""Ready for real weights (issue #27): device/dtype/quantization options, `myvlm check`, `myvlm bench`, and the GPU
check script's code path, all on the toy models on CPU."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import myvlm
from myvlm.cli import main
from myvlm.errors import MyVLMError
from myvlm.runtime import load_plan, resolve_device, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys):
    """The CLI in this process (a fresh interpreter costs ~10 s of imports on a loaded CI machine)."""

    def run(*args) -> Done:
        code = main(list(args))
        out, err = capsys.readouterr()
        return Done(code, out, err)

    return run


# --- 1. devices, precision, quantization ----------------------------------------------------------------------------
def test_auto_device_and_dtype_on_this_machine():
    device = resolve_device("auto")
    assert device.type in ("cpu", "cuda", "mps")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", None) == torch.bfloat16
    assert resolve_device(None) is None and resolve_dtype(None, None) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device": "tpu"}, "unknown device"),
        ({"dtype": "int3"}, "unknown dtype"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "not both"),
        ({"device_map": "balanced"}, "unknown device map"),
    ],
)
def test_bad_loading_choices_are_one_line_errors(options, message):
    with pytest.raises(MyVLMError, match=message):
        load_plan(**options)


def test_device_map_without_accelerate_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(MyVLMError, match=r"--device-map needs accelerate; pip install 'myvlm\[gpu\]'"):
        load_plan(device_map="auto")


@pytest.mark.skipif(not NO_CUDA, reason="the CPU-only messages")
@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit", "--device=cuda", "--device=cuda:1"])
def test_cuda_only_options_say_what_to_install(flag, run_cli):
    done = run_cli("check", "toy-llava", flag)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "CUDA" in lines[0] and ("myvlm[gpu]" in lines[0] or "CUDA build of torch" in lines[0])


def test_bfloat16_model_trains_a_float32_vector_and_device_map_loads():
    vlm = myvlm.load("toy-blip2", dtype="bfloat16", device="cpu")
    assert vlm.backend.dtype == torch.bfloat16
    from myvlm.check import generated_photos

    images, captions = generated_photos(2)
    result = vlm.learn("c", "Bobby", images, captions, myvlm.TrainingConfig(steps=2, starts=1), progress=False)
    assert result.vector.dtype == torch.float32 and vlm.concepts["c"].vector.dtype == torch.float32
    mapped = myvlm.load("toy-llava", device_map="auto", dtype="float32")
    assert mapped.caption(images[:1], [[]], max_new_tokens=4)[0].text is not None


# --- 2. myvlm check -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["toy-llava", "toy-blip2"])
def test_check_passes_on_both_toy_models(model, tmp_path, run_cli):
    done = run_cli("check", model, "--json", str(tmp_path / "check.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks passed" in done.stdout and "s per training step" in done.stdout
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["ok"] is True and report["peak_memory_mb"] > 0 and report["seconds_per_step"] > 0
    names = {c["name"] for c in report["checks"]}
    assert {"gating", "hooks fire", "regularizer finite", "training lowers the loss", "captioning"} <= names


def test_check_fails_when_a_check_does_not_hold(monkeypatch):
    from myvlm import check

    vlm = myvlm.load("toy-llava")
    monkeypatch.setattr(check, "_without_hooks", lambda vlm, batch: torch.zeros(1))  # gating can no longer match
    report = check.run_check(vlm, steps=2)
    assert not report.ok and [c.name for c in report.checks if not c.ok] == ["gating"]


# --- 3. myvlm bench ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """A toyworld export in both layouts (2 concepts), written once for the module."""
    from myvlm.toyworld import export_dataset

    return export_dataset(tmp_path_factory.mktemp("toydata"), n_concepts=2, layout="both")


def test_both_layouts_are_read(toy_data):
    from myvlm.bench import read_dataset

    official = read_dataset(toy_data / "myvlm")
    assert official.layout == "myvlm" and [c.identifier for c in official.concepts] == ["Ivy", "Mia"]
    ivy = official.concepts[0]
    assert len(ivy.train) == 4 and len(ivy.positives) == 20 and ivy.class_word == "figure"
    assert len(ivy.negatives) == 20 + 10 + 20  # shared negatives, its hard negatives, the other concept's photos
    assert all("Ivy" in c[0] for c in ivy.captions) and not ivy.questions
    yollava = read_dataset(toy_data / "yollava")
    assert yollava.layout == "yollava" and [c.identifier for c in yollava.concepts] == ["Ivy", "Mia"]
    mia = yollava.concepts[1]
    assert len(mia.train) == 4 and len(mia.positives) == 10 and len(mia.negatives) == 10 and len(mia.questions) == 10
    assert mia.questions[0].image.is_file() and mia.questions[0].answer in mia.questions[0].options


def test_the_myvlm_layout_without_a_test_folder_splits_the_listed_photos(tmp_path, toy_data):
    import shutil

    from myvlm.bench import read_dataset

    for name in ("Ivy", "Mia"):
        shutil.copytree(toy_data / "myvlm" / name, tmp_path / name, ignore=shutil.ignore_patterns("*_negatives"))
        shutil.rmtree(tmp_path / name / "positives")
    concepts = read_dataset(tmp_path, n_train=3).concepts
    assert len(concepts[0].train) == 3 and len(concepts[0].positives) == 1 and len(concepts[0].negatives) == 1


def test_answers_are_parsed_as_the_papers_score_them():
    from myvlm.bench import Question, _answers_yes, _chosen

    assert _answers_yes("Yes, Bobby is there.") is True and _answers_yes("no.") is False
    assert _answers_yes("a red square") is None
    question = Question(Path("x.png"), "What color is Mia?", {"A": "red", "B": "blue"}, "A")
    assert _chosen("A", question) == "A" and _chosen("(B) blue", question) == "B"
    assert _chosen("Mia is red.", question) == "A" and _chosen("red or blue", question) is None


def test_a_folder_that_is_no_dataset_is_a_one_line_error(tmp_path, run_cli):
    done = run_cli("bench", "--data", str(tmp_path), "--model", "toy-llava")
    assert done.returncode == 2 and "no concepts found" in done.stderr and len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("model", ["toy-llava", "toy-blip2"])
@pytest.mark.parametrize("layout", ["myvlm", "yollava"])
def test_bench_prints_the_table_on_both_layouts(model, layout, toy_data, tmp_path, run_cli):
    out = tmp_path / "bench.json"
    args = ["bench", "--data", str(toy_data / layout), "--model", model, "--steps", "3", "--max-images", "2"]
    done = run_cli(*args, "--json", str(out), "--markdown", str(tmp_path / "bench.md"))
    assert done.returncode == 0, done.stderr
    assert "recall" in done.stdout and "rec_w" in done.stdout and "\nmean " in done.stdout
    result = json.loads(out.read_text())
    assert result["dataset"]["layout"] == layout and len(result["concepts"]) == 2
    for row in [*result["concepts"], result["overall"]]:
        for metric in ("recall", "precision", "f1", "recognition_weighted", "similarity"):
            assert 0 <= row[metric] <= 1
    assert (result["overall"]["vqa_accuracy"] is not None) == (layout == "yollava")
    assert result["peak_memory_mb"] > 0 and "| **mean** |" in (tmp_path / "bench.md").read_text()


def test_bench_trains_with_the_vqa_recipe(toy_data, tmp_path, run_cli):
    out = tmp_path / "bench.json"
    args = ["bench", "--data", str(toy_data / "yollava"), "--model", "toy-blip2", "--task", "vqa", "--steps", "2"]
    done = run_cli(*args, "--max-images", "1", "--gate", "oracle", "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["task"] == "vqa" and result["gate"] == "oracle"
    # oracle: the identifier can only appear on its own photos, so each concept's precision is 1 (or 0: never named)
    assert all(row["precision"] in (0.0, 1.0) for row in result["concepts"])


# --- 4. the GPU check's code path -----------------------------------------------------------------------------------
def test_gpu_check_runs_its_code_path_tiny_on_cpu(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py --tiny: every row the GPU run writes, with tiny stand-ins of the same classes."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    out = tmp_path / "gpu.json"
    monkeypatch.setattr("sys.argv", ["gpu_check.py", "--tiny", "--out", str(out), "--steps", "2", "--tokens", "3"])
    gpu_check.main()
    rows = {row["model"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"llava-1.5-7b-shaped", "blip2-flan-t5-xl-shaped", "qwen2-vl-7b-shaped"}
    for name in ("llava-1.5-7b-shaped", "blip2-flan-t5-xl-shaped"):
        row = rows[name]
        assert row["fast_s_per_100_steps"] > 0 and row["official_s_per_100_steps"] > 0
        assert row["caption_plain_s"] > 0 and row["caption_concept_s"] > 0
    assert rows["qwen2-vl-7b-shaped"]["caption_plain_s"] > 0 and "backend" in rows["qwen2-vl-7b-shaped"]["note"]
