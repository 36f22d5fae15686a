"""Fixtures shared by the tests; the helpers they use live in helpers.py."""

from __future__ import annotations

import os

# Triton kernels run on the CPU in Triton's interpreter (tests/test_paged_triton.py). Triton
# reads this once, when it is first imported, and torch may import it: set it before anything.
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from helpers import make_engine  # noqa: E402
from tandem.engine import Engine  # noqa: E402
from tandem.engine.model.loader import LoadedModel, load_model  # noqa: E402


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """A shared tiny-llama engine; tests must leave it idle."""
    eng = make_engine(model="tiny-llama", max_batch_tokens=64, max_num_seqs=16, block_size=4)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    return load_model("tiny-llama")
