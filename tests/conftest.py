"""Shared fixtures: tiny checkpoints of every family (built once per session), a tokenizer."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from engine.model.arch import FAMILIES

# one thread a worker when pytest-xdist runs two (threads of two workers would fight over the two cores)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))
# quantised-expert caches of test runs go to a throw-away folder, not the user's ~/.cache
os.environ.setdefault("MOETUNE_CACHE", tempfile.mkdtemp(prefix="moetune-cache-"))

FAMILY_NAMES = list(FAMILIES)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LLM_ADAPTERS = SHARED / "data" / "llm-adapters"


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models gain
    nothing from threads, and OpenMP threads that spin at barriers crawl (100x) when another process holds one
    of a shared machine's two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(family, **sizes) -> path of a saved random-weight checkpoint (cached)."""
    from engine.model import make_tiny_model

    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("tiny")

    def make(family: str, layers: int = 2, hidden: int = 64, experts: int = 4, top_k: int = 2, seed: int = 0) -> Path:
        key = (family, layers, hidden, experts, top_k, seed)
        if key not in cache:
            out = root / "-".join(map(str, key))
            cache[key] = make_tiny_model(family, out, layers=layers, hidden=hidden, experts=experts,
                                         top_k=top_k, seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny models' byte-level BPE tokenizer (pad 0, bos 1, eos 2, ChatML chat template)."""
    from engine.model import build_tokenizer

    return build_tokenizer()
