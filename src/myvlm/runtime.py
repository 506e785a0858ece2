"""Where and how a model runs: device, dtype, `device_map`, 4-/8-bit loading, and peak memory.

Users run the real models (LLaVA-1.5-7B, BLIP-2 Flan-T5-XL) on GPUs of every size, so loading takes the choices the
HF stack offers and turns every missing piece (no CUDA build of torch, no bitsandbytes, no accelerate) into one
`MyVLMError` line that says what to install, before any weights are read. Concept vectors stay float32 whatever the
model's dtype (`myvlm.embeddings`), so a bfloat16 or 4-bit model trains the same float32 vector.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from myvlm.errors import MyVLMError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "bfloat16", "float16", "float32")
GPU_EXTRA = "pip install 'myvlm[gpu]'"


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """`auto` picks CUDA, then MPS, then the CPU; an unavailable choice is a one-line error. None stays None."""
    if device is None or isinstance(device, torch.device):
        return device
    text = str(device).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise MyVLMError(f"unknown device '{device}'; use one of {', '.join(DEVICES)}") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise MyVLMError(
                f"device '{device}': this torch has no usable CUDA GPU; install a CUDA build of torch "
                "(https://pytorch.org/get-started/locally/) or use --device cpu"
            )
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise MyVLMError(f"device '{device}': only {torch.cuda.device_count()} CUDA GPU(s) here")
    elif chosen.type == "mps" and not _mps_available():
        raise MyVLMError(f"device '{device}': MPS is not available (it needs Apple silicon and macOS 12.3+)")
    elif chosen.type not in ("cpu", "cuda", "mps"):
        raise MyVLMError(f"unknown device '{device}'; use one of {', '.join(DEVICES)}")
    return chosen


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None) -> torch.dtype | None:
    """`auto`: bfloat16 on a CUDA GPU that supports it (else float16), float16 on MPS, float32 on the CPU."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    text = str(dtype).strip().lower()
    if text == "auto":
        kind = device.type if device is not None else "cpu"
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if kind == "mps" else torch.float32
    if text not in DTYPES:
        raise MyVLMError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return getattr(torch, text)


@dataclass(frozen=True)
class LoadPlan:
    """What `from_pretrained` passes to the HF model class, and where to move the model afterwards (None: stay)."""

    model_kwargs: dict = field(default_factory=dict)
    move_to: torch.device | None = None


def load_plan(
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
) -> LoadPlan:
    """Check the loading choices against this machine and turn them into HF keyword arguments."""
    if load_in_4bit and load_in_8bit:
        raise MyVLMError("choose one of 4-bit and 8-bit loading, not both")
    quantized = load_in_4bit or load_in_8bit
    if device_map is not None and device_map != "auto" and not isinstance(device_map, dict):
        raise MyVLMError(f"unknown device map '{device_map}'; use auto")
    if quantized and not torch.cuda.is_available():  # the first thing to say on a machine without a GPU
        raise MyVLMError(
            f"{4 if load_in_4bit else 8}-bit loading needs a CUDA GPU and bitsandbytes ({GPU_EXTRA}); this machine "
            "has no CUDA GPU, load in bfloat16 or float32 instead"
        )
    if quantized or device_map is not None:
        needed = "4-bit loading" if load_in_4bit else "8-bit loading" if load_in_8bit else "--device-map"
        if importlib.util.find_spec("accelerate") is None:
            raise MyVLMError(f"{needed} needs accelerate; {GPU_EXTRA}")
    if quantized:
        bits = 4 if load_in_4bit else 8
        if importlib.util.find_spec("bitsandbytes") is None:
            raise MyVLMError(f"{bits}-bit loading needs bitsandbytes; {GPU_EXTRA}")
    chosen = resolve_device(device)
    if quantized and chosen is not None and chosen.type != "cuda":
        raise MyVLMError(f"{4 if load_in_4bit else 8}-bit loading runs on CUDA only, not on device '{device}'")
    if quantized and chosen is None:
        chosen = torch.device("cuda")
    torch_dtype = resolve_dtype(dtype, chosen)
    kwargs: dict = {"dtype": torch_dtype}
    if quantized:
        from transformers import BitsAndBytesConfig

        compute = torch_dtype if torch_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        kwargs["dtype"] = compute
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute, bnb_4bit_quant_type="nf4")
            if load_in_4bit
            else BitsAndBytesConfig(load_in_8bit=True)
        )
    if device_map is not None:
        kwargs["device_map"] = device_map
        return LoadPlan(kwargs, None)
    if quantized:  # bitsandbytes places the weights while loading; a quantized model cannot be moved afterwards
        kwargs["device_map"] = {"": chosen.index or 0}
        return LoadPlan(kwargs, None)
    return LoadPlan(kwargs, chosen)


# --- peak memory ----------------------------------------------------------------------------------------------------
def _rss_mb(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block of work: allocated CUDA memory where a GPU is in use, else the process's peak RSS.

    `with PeakMemory() as peak: ...` then `peak.report()` gives {"peak_memory_mb", "peak_memory_of", "seconds"}.
    On Linux the RSS peak is reset at the start (/proc/self/clear_refs), so it is this block's; elsewhere it is the
    process's peak so far (None where it cannot be read)."""

    def __init__(self) -> None:
        self.cuda = False
        self.peak_mb: float | None = None
        self.seconds = 0.0

    def __enter__(self) -> PeakMemory:
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with contextlib.suppress(OSError):  # not Linux: the process's peak so far
                Path("/proc/self/clear_refs").write_text("5")
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mb = _rss_mb("VmHWM")
        self.seconds = time.perf_counter() - self._start

    def report(self) -> dict:
        return {
            "peak_memory_mb": None if self.peak_mb is None else round(self.peak_mb, 1),
            "peak_memory_of": "cuda allocated" if self.cuda else "process RSS",
        }
