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
