import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for tests/helpers.py


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
