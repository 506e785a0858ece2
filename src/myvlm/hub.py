"""Model names before anything heavy loads: did-you-mean suggestions and failing fast when the hub is out of reach.

No torch or transformers here, so `myvlm caption --model toy-lava` answers in a fraction of a second."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from myvlm.errors import MyVLMError
from myvlm.toynames import TOY_MODELS

# Names a "did you mean" can suggest.
KNOWN_MODELS = (
    *TOY_MODELS,
    "Salesforce/blip2-opt-2.7b",
    "Salesforce/blip2-opt-6.7b",
    "Salesforce/blip2-flan-t5-xl",
    "Salesforce/blip2-flan-t5-xxl",
    "llava-hf/llava-1.5-7b-hf",
    "llava-hf/llava-1.5-13b-hf",
)
HUB_TIMEOUT = 5.0  # seconds to wait for the hub before saying it cannot be reached


def did_you_mean(name: str) -> str:
    """ "; did you mean X?" for a name close to a known model (case aside), else ""."""
    lowered = {model.lower(): model for model in KNOWN_MODELS}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.75)
    match = lowered[close[0]] if close else None
    return f"; did you mean {match}?" if match and match != name else ""


def check_hub_model(name: str) -> None:
    """Fail fast, in one line, for a hub id that cannot be loaded: not in the local cache and either the hub is off
    (HF_HUB_OFFLINE) or cannot be reached, or a toy name misspelt. Downloads otherwise go through transformers'
    retries, which take half a minute of noise to give up."""
    from huggingface_hub import constants, get_session, try_to_load_from_cache

    suggestion = did_you_mean(name) or "; give a hub id (owner/model), a local model folder, toy-llava or toy-blip2"
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except ValueError:  # the hub client's HFValidationError: not of the form owner/model
        raise MyVLMError(f"unknown model '{name}'{suggestion}") from None
    if "/" not in name and did_you_mean(name):  # hub models live under an owner: "toy-lava" is a typo
        raise MyVLMError(f"unknown model '{name}'{did_you_mean(name)}")
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise MyVLMError(f"model '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set{suggestion}")
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_TIMEOUT)
    except Exception as error:  # noqa: BLE001 - the HTTP client's connect, DNS, proxy and timeout errors
        reason = (str(error).strip() or type(error).__name__).splitlines()[0][:120]
        raise MyVLMError(
            f"cannot download model '{name}': it is not in the local Hugging Face cache and {constants.ENDPOINT} "
            f"cannot be reached ({reason}){suggestion}"
        ) from None


def check_model_name(name: str) -> None:
    """What can be checked of a --model before loading torch: a hub id (not a toy name, not a local folder)."""
    if name in TOY_MODELS or Path(name).expanduser().exists():
        return
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:  # a path, not owner/model
        raise MyVLMError(f"cannot load model '{name}': no such folder")
    check_hub_model(name)
