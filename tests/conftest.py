"""Fixtures shared by the tests; the helpers they use live in helpers.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers import make_engine
from tandem.engine import Engine
from tandem.engine.model.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """A shared tiny-llama engine; tests must leave it idle."""
    eng = make_engine(model="tiny-llama", max_batch_tokens=64, max_num_seqs=16, block_size=4)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    return load_model("tiny-llama")
