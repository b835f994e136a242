"""qwen_ref.memory: a layer's freed intermediates stay mapped, so the next layer does not fault them in."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# In a fresh process (the allocator's state is per process), rounds shaped like a decoder layer:
# four 6 MB arrays made and filled, then freed together. Prints the page faults of each round, or
# "refused" if keep_freed_memory() did not apply (no glibc).
_LAYER_ROUNDS = """
import resource, sys
import numpy as np
from qwen_ref.memory import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit(print("refused"))
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones(1536 * 1024, dtype=np.float32) for _ in range(4)]  # [1.5M] each, 6 MB
    del arrays
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""
_PAGES_PER_ROUND = 4 * 6 * 2**20 // 4096


def _faults_per_round(mode: str) -> list[int] | None:
    # NumPy asks for huge pages for arrays of 4 MB and more; without them a 4 KB page is a fault,
    # so the counts below do not depend on the machine's transparent-huge-page setting.
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _LAYER_ROUNDS, mode], cwd=REPO, check=True, capture_output=True,
                         text=True, env={**env, "NUMPY_MADVISE_HUGEPAGE": "0"}).stdout
    return None if out.strip() == "refused" else [int(n) for n in out.split()]


def test_a_layers_freed_arrays_are_reused_without_page_faults():
    kept = _faults_per_round("keep")
    if kept is None:
        pytest.skip("no glibc mallopt here")
    default = _faults_per_round("default")
    # By default glibc trims its heap after each round (more than twice the largest array is free
    # at its top) and every round faults its pages in again; kept, only the first round does.
    assert min(default[2:]) >= _PAGES_PER_ROUND // 2
    assert kept[0] >= _PAGES_PER_ROUND // 2
    assert max(kept[2:]) <= _PAGES_PER_ROUND // 100  # a few pages of NumPy's and Python's own
