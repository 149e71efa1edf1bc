"""Shared fixtures: the real libllama and the real default model (fetched by scripts/fetch_llama.sh)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llama_lib  # noqa: E402

# Tests run on the machine's two cores; more threads only contend.
N_THREADS = int(os.environ.get("TEST_THREADS", "2"))


@pytest.fixture(scope="session")
def library():
    return llama_lib.load_library()


@pytest.fixture(scope="session")
def model(library):
    m = llama_lib.Model()
    yield m
    m.close()


@pytest.fixture(scope="session")
def vocab(model):
    return model.vocab
