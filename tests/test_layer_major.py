"""Layer-major prompts (for checkpoints larger than memory) give the chunk-by-chunk logits bit for bit.

Each chunk meets the same operations on the same float32 values in both orders, so there is no
tolerance: any difference means a chunk saw other keys, positions or inputs.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
from helpers import FIXTURES

import qwen_ref.model
from qwen_ref.backends import BACKEND_NAMES, get_backend
from qwen_ref.generation import prefill
from qwen_ref.model import ALL_ROWS, LAST_ROW, load_model
from qwen_ref.paging import MADV_COLD, _mapping, fits_in_memory, page_cache_fraction


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
@pytest.mark.parametrize("case, chunk, kv_dtype", [("long_seq_bf16", 96, "float32"), ("mqa_f16", 5, "float32"),
                                                   ("mha_f32_untied", 3, "float32"), ("mqa_f16", 4, "bfloat16"),
                                                   ("long_seq_bf16", 100, "float16")])
def test_layer_major_logits_and_cache_equal_chunk_by_chunk_bit_for_bit(backend_name, case, chunk, kv_dtype):
    tokens = np.load(FIXTURES / case / "reference.npz")["prompt_tokens"]
    chunk_major = load_model(FIXTURES / case, get_backend(backend_name), kv_dtype=kv_dtype, layer_major=False)
    layer_major = load_model(FIXTURES / case, get_backend(backend_name), kv_dtype=kv_dtype, layer_major=True)
    assert chunk_major.pager is None and layer_major.pager is not None
    for rows in (ALL_ROWS, LAST_ROW, slice(chunk - 2, chunk + 3)):  # every row, the last, across a chunk end
        want_cache, got_cache = chunk_major.new_cache(len(tokens)), layer_major.new_cache(len(tokens))
        progress = []
        want = prefill(chunk_major, tokens, want_cache, rows, chunk)
        got = prefill(layer_major, tokens, got_cache, rows, chunk, on_chunk=progress.append)
        assert np.array_equal(got, want), rows
        assert sum(progress) == len(tokens) and got_cache.length == want_cache.length == len(tokens)
        # the caches agree too, so decoding after either gives the same tokens
        assert np.array_equal(got_cache.keys, want_cache.keys) and np.array_equal(got_cache.values, want_cache.values)


def test_the_pager_advises_the_checkpoint_file_pages_of_every_layer_weight():
    model = load_model(FIXTURES / "hd64_sharded_bf16", get_backend("numpy"), layer_major=True)
    for i in range(model.config.num_hidden_layers):
        for name, weight in model._layer_weights(i).items():
            found = _mapping(weight)
            assert found is not None, (i, name)
            mapping, offset = found
            # the offset is the weight's place in its file: the bytes there are the weight's
            assert mapping[offset : offset + 16] == weight.reshape(-1).view(np.uint8)[:16].tobytes()
            # the page-aligned range advise() hands the kernel is accepted (madvise raises otherwise)
            begin = offset - offset % mmap.PAGESIZE
            mapping.madvise(mmap.MADV_WILLNEED, begin, offset + weight.nbytes - begin)
            mapping.madvise(MADV_COLD, begin, offset + weight.nbytes - begin)


@pytest.mark.parametrize("fits", [True, False])
def test_layer_major_is_chosen_when_the_weights_do_not_fit(tmp_path, monkeypatch, fits):
    model = load_model(FIXTURES / "mqa_f16", get_backend("numpy"))  # this machine: it fits
    assert model.pager is None
    available = model.weight_bytes() * (2 if fits else 1)  # a tenth must stay free: equal does not fit
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {4 * available // 1024} kB\nMemAvailable: {available // 1024} kB\n")
    assert fits_in_memory(model.weight_bytes(), meminfo) == fits
    assert fits_in_memory(model.weight_bytes(), tmp_path / "missing")  # unknown: the chunk-by-chunk order
    monkeypatch.setattr(qwen_ref.model, "fits_in_memory", lambda n: fits_in_memory(n, meminfo))  # this "machine"
    assert (load_model(FIXTURES / "mqa_f16", get_backend("numpy")).pager is None) == fits


def test_page_cache_fraction_counts_the_pages_a_read_brought_in_and_an_eviction_took_out(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(np.random.default_rng(0).bytes(64 * mmap.PAGESIZE))
    assert page_cache_fraction([path]) == 1.0  # just written: every page is cached
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        evicted = page_cache_fraction([path])
        os.pread(fd, 16 * mmap.PAGESIZE, 0)  # a quarter read back
        quarter = page_cache_fraction([path])
    finally:
        os.close(fd)
    if evicted == 1.0:
        pytest.skip("this file system keeps its pages in memory (tmpfs): nothing to evict")
    # readahead may bring in more than was read, never less
    assert evicted < 0.25 <= quarter <= 1.0
    assert page_cache_fraction([]) is None
