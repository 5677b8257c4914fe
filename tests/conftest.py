"""Shared fixtures: one torch thread for the whole suite, float64 on demand, tiny recipes."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers import TINY_RECIPE

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """Generated data (e.g. inverse-dynamics trajectories) is cached in a tmp folder, never in ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("ML3_CACHE_DIR", str(tmp_path_factory.mktemp("ml3_cache")))
    yield
    patch.undo()


@pytest.fixture
def tiny_recipe() -> dict[str, Any]:
    """A fresh deep copy of the tiny recipe that a test may modify."""
    return copy.deepcopy(TINY_RECIPE)


@pytest.fixture
def float64():
    """Run a test with float64 as torch's default dtype (restored afterwards)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
