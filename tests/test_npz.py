"""qwen_ref.npz.save_npz: the same arrays give the same bytes, the committed fixtures' included."""

import numpy as np
from helpers import FIXTURES

from qwen_ref.npz import save_npz


def test_saving_twice_gives_identical_bytes_that_np_load_reads(tmp_path):
    arrays = {"tokens": np.arange(5), "logits": np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)}
    save_npz(tmp_path / "a.npz", arrays)
    save_npz(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = np.load(tmp_path / "a.npz")
    assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in arrays.items())


def test_the_committed_references_are_what_save_npz_writes(tmp_path):
    # tools/make_fixtures.py writes them with save_npz(compress=True): a rerun must reproduce them
    for path in sorted(FIXTURES.glob("*/reference.npz")):
        stored = np.load(path)
        save_npz(tmp_path / "x.npz", {k: stored[k] for k in stored.files}, compress=True)
        assert (tmp_path / "x.npz").read_bytes() == path.read_bytes(), path.parent.name
