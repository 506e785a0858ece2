"""The concept vectors of one model as a module: what training optimizes, what the library saves and loads.

As in peft's prompt embeddings, the trainable thing is an `nn.Module`: each concept is one `nn.Parameter` of the
model's concept width (frozen outside training), next to the identifier the VLM should say for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from myvlm.errors import MyVLMError


@dataclass(frozen=True)
class ActiveConcept:
    """A concept the model can insert: its name, identifier (the word the VLM should say) and current vector."""

    name: str
    identifier: str
    vector: torch.Tensor


class ConceptEmbeddings(nn.Module):
    """One vector per concept name. Names may hold characters a parameter name may not ('.'), so parameters are
    keyed by position of first addition and looked up through `name`."""

    def __init__(self, width: int, device: torch.device | str | Callable[[], torch.device] = "cpu") -> None:
        """`device`: where vectors live, or a function that says where the model is now (it may be moved later)."""
        super().__init__()
        self.width = width
        self._device = device if callable(device) else (lambda fixed=torch.device(device): fixed)
        self.vectors = nn.ParameterDict()
        self.identifiers: dict[str, str] = {}
        self._keys: dict[str, str] = {}
        self._added = 0

    @property
    def device(self) -> torch.device:
        return self._device()

    # --- reading ----------------------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, name: str) -> ActiveConcept:
        return ActiveConcept(name, self.identifiers[name], self.vector(name))

    def items(self) -> Iterator[tuple[str, ActiveConcept]]:
        return ((name, self[name]) for name in self._keys)

    def vector(self, name: str) -> nn.Parameter:
        return self.vectors[self._keys[name]]

    def stack(self, names: Sequence[str]) -> torch.Tensor:
        """[len(names), width]: the vectors of `names` in that order (0 rows for no names)."""
        if not names:
            return torch.zeros(0, self.width, device=self.device)
        return torch.stack([self.vector(name) for name in names])

    # --- writing ----------------------------------------------------------------------------------------------
    def add(self, name: str, identifier: str, vector: torch.Tensor, model_id: str = "this model") -> ActiveConcept:
        """Add or replace concept `name` with a frozen copy of `vector` (checked against the width)."""
        vector = torch.as_tensor(vector, dtype=torch.float32).reshape(-1)
        if vector.numel() != self.width:
            raise MyVLMError(
                f"concept '{name}': embedding width {vector.numel()} does not match {model_id} "
                f"(needs {self.width}); it was trained for another model"
            )
        if not torch.isfinite(vector).all():
            raise MyVLMError(f"concept '{name}': its embedding holds NaN or infinite values")
        if not isinstance(identifier, str) or not identifier.strip():
            raise MyVLMError(f"concept '{name}': the identifier (the word the VLM should say) is empty")
        if name not in self._keys:
            self._keys[name] = f"concept_{self._added}"
            self._added += 1
        self.identifiers[name] = identifier
        self.set(name, vector)
        return self[name]

    def set(self, name: str, vector: torch.Tensor, *, trainable: bool = False) -> nn.Parameter:
        """Give `name` a new vector: a fresh parameter holding a float32 copy, trainable or frozen. An
        `nn.Parameter` on the right device is taken as it is (a caller that wants the gradients keeps its own)."""
        if name not in self._keys:
            raise MyVLMError(f"concept '{name}' has no embedding; add it first")
        if isinstance(vector, nn.Parameter) and vector.device == self.device:
            parameter = vector
        else:
            parameter = nn.Parameter(vector.detach().clone().float().to(self.device), requires_grad=trainable)
        self.vectors[self._keys[name]] = parameter
        return parameter

    def remove(self, name: str) -> None:
        key = self._keys.pop(name, None)
        if key is not None:
            del self.vectors[key]
            del self.identifiers[name]

    def snapshot(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Detached copies of the vectors of `names`, to restore with `restore`."""
        return {name: self.vector(name).detach().clone() for name in names}

    def restore(self, vectors: dict[str, torch.Tensor]) -> None:
        for name, vector in vectors.items():
            self.set(name, vector)

    # --- library ----------------------------------------------------------------------------------------------
    def load(self, library, name: str, model_id: str) -> bool:
        """Add library concept `name` with its vector for `model_id`; False if it has none for that model."""
        concept = library.get(name)
        vector = library.load_embedding(name, model_id, self.width)
        if vector is None:
            return False
        self.add(name, concept.identifier, vector, model_id)
        return True

    def save(self, library, name: str, model_id: str, **info) -> None:
        """Store the current vector of `name` for `model_id` in the library (`info`: its manifest entry, an
        `entry=EmbeddingEntry(...)` and/or its fields)."""
        library.save_embedding(name, model_id, self.vector(name).detach(), **info)
