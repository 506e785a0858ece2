"""The suite runs on two pytest-xdist workers (`-n 2 --dist loadgroup`, the README's test command): each worker gets its
share of the cores for torch, and tests that share an expensive fixture run in one worker, so it is built once: a
module's tests go together, and in the family matrix each family's tests go together (its model folder, pretraining
and CLI run)."""

from __future__ import annotations

import os

import pytest

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Set before torch is imported anywhere in the worker; subprocesses (the CLI, the web app) inherit it.
    threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = item.module.__name__
        family = getattr(getattr(item, "callspec", None), "params", {}).get("family")
        if family is not None:
            group = f"{group}:{family}"
        item.add_marker(pytest.mark.xdist_group(group))
