"""Import embeddings trained by the official MyVLM code (snap-research/MyVLM).

Its checkpoints are `concept_embeddings_<VLM>_<TASK>.pt` holding `{step: {"keys": T, "values": T}}`: `values` are the
learned concept embeddings (one row per concept), `keys` the head signals they were trained with. We read them with
`torch.load(weights_only=True)`, so a malicious pickle cannot run code.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from myvlm.errors import MyVLMError

FILENAME = re.compile(r"concept_embeddings_(?P<vlm>[\w.-]+?)_(?P<task>captioning|vqa|rec)\.pt$")


def load_official_embedding(
    path: str | os.PathLike, *, step: int | None = None, row: int = 0
) -> tuple[torch.Tensor, dict]:
    """The vector at `step` (default: the last one) and what the file name tells about it."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MyVLMError(f"{path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MyVLMError(f"{path}: not a loadable MyVLM checkpoint ({first_line[:200]})") from None
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise MyVLMError(f"{path}: expected {{step: {{'keys', 'values'}}}}, got {type(checkpoint).__name__}")
    steps = sorted(k for k in checkpoint if isinstance(k, int))
    if not steps:
        raise MyVLMError(f"{path}: no integer training steps in the checkpoint")
    chosen = steps[-1] if step is None else step
    if chosen not in checkpoint:
        raise MyVLMError(f"{path}: no step {chosen} (available: {steps[0]}…{steps[-1]})")
    entry = checkpoint[chosen]
    values = entry.get("values") if isinstance(entry, dict) else None
    if not isinstance(values, torch.Tensor) or values.dim() not in (1, 2):
        raise MyVLMError(f"{path}: step {chosen} has no 'values' tensor of concept embeddings")
    values = values.reshape(-1, values.shape[-1])
    if not 0 <= row < len(values):
        raise MyVLMError(f"{path}: concept row {row} out of range (the file holds {len(values)})")
    match = FILENAME.search(path.name)
    info = {"source": "official", "step": chosen}
    if match:
        info |= {"official_vlm": match["vlm"], "task": "caption" if match["task"] == "captioning" else match["task"]}
    return values[row].float().clone(), info
