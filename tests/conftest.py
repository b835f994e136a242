import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for tests/helpers.py

from helpers import FIXTURES, with_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def text_model(tmp_path_factory):
    """The full-vocabulary fixture checkpoint with the real Qwen1.5 tokenizer beside it."""
    return with_tokenizer(FIXTURES / "full_vocab_bf16", tmp_path_factory.mktemp("m") / "full_vocab")


@pytest.fixture(scope="session")
def torch_reference():
    """torch + transformers for live oracle tests; CI sets QWEN_REF_REQUIRE_REFERENCE=1 so they cannot skip."""
    if os.environ.get("QWEN_REF_REQUIRE_REFERENCE") == "1":
        import torch
        import transformers
    else:
        torch = pytest.importorskip("torch")
        transformers = pytest.importorskip("transformers")
    torch.set_num_threads(os.cpu_count() or 1)
    return torch, transformers


@pytest.fixture(scope="session")
def matplotlib():
    """matplotlib for the tests of --plot and heat maps; CI sets QWEN_REF_REQUIRE_PLOT=1 so they cannot skip."""
    if os.environ.get("QWEN_REF_REQUIRE_PLOT") == "1":
        import matplotlib
    else:
        matplotlib = pytest.importorskip("matplotlib")
    return matplotlib
