"""qwen_ref.memory: freed intermediates stay mapped, so the next forward pass does not fault them in."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# In a fresh process (the allocator's state is per process): page faults of filling a new 20 MB
# array, freeing it, and filling another one.
_FAULTS_OF_A_SECOND_ARRAY = """
import resource, sys
import numpy as np
from qwen_ref.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults_of_filling():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.empty(5 << 20, dtype=np.float32)
    a.fill(1.0)
    del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults_of_filling(), faults_of_filling())
"""


def _faults(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_SECOND_ARRAY, mode], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    first, second = out.split()
    return int(first), int(second)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_a_freed_array_is_reused_without_page_faults():
    _, default_second = _faults("default")
    _, kept_second = _faults("keep")
    assert default_second > 0  # by default glibc maps the second array afresh (here ~500 faults)
    assert kept_second * 10 <= default_second  # kept, it reuses the first one's pages (here 0)
