"""LLaVA-1.5 on folders as outsiders bring them: no pad token (as the released Llama tokenizers), missing files."""

from __future__ import annotations

import json

import pytest

import myvlm
from families.llava import build
from myvlm.toyworld import render_scene, sample_scene


def test_a_tokenizer_without_pad_token_trains_and_captions_batches(tmp_path):
    folder = build(tmp_path / "llava", 0)
    settings = folder / "tokenizer_config.json"
    saved = json.loads(settings.read_text())
    saved.pop("pad_token")
    settings.write_text(json.dumps(saved))
    vlm = myvlm.load(str(folder))
    assert vlm.processor.tokenizer.pad_token == vlm.processor.tokenizer.eos_token  # batches pad with EOS, masked out
    images = [render_scene(sample_scene(i)) for i in range(2)]
    captions = [["Bobby is on the left ."], ["Bobby is a small red circle on the right ."]]  # two lengths: padding
    result = vlm.learn("bobby", "Bobby", images, captions, myvlm.TrainingConfig(steps=2, batch_size=2), progress=False)
    assert result.steps_done == 2
    assert len(vlm.caption(images, [["bobby"], []], max_new_tokens=4)) == 2


@pytest.mark.parametrize("missing", ["model.safetensors", "processor_config.json"])
def test_a_folder_missing_its_weights_or_image_processor_is_one_clear_error(tmp_path, missing):
    """Any family: an incomplete model folder fails at load in one MyVLMError line, not a transformers traceback."""
    folder = build(tmp_path / "llava", 0)
    (folder / missing).unlink()
    with pytest.raises(myvlm.MyVLMError, match="cannot load model") as error:
        myvlm.load(str(folder))
    assert "\n" not in str(error.value)
