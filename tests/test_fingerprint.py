"""Checkpoint hashes: the content decides, and a file's sha256 is read from the cache only while it is unchanged."""

from __future__ import annotations

import hashlib
import json
import os

from helpers import random_checkpoint, small_config

from qwen_ref.fingerprint import checkpoint_hash


def test_the_hash_lists_each_file_by_name_and_content(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "m"
    random_checkpoint(model, small_config())
    listing = "".join(f"{name} {hashlib.sha256((model / name).read_bytes()).hexdigest()}\n"
                      for name in ("config.json", "model.safetensors"))
    assert checkpoint_hash(model) == hashlib.sha256(listing.encode()).hexdigest()


def test_a_cached_sha256_is_used_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "m"
    random_checkpoint(model, small_config())
    first = checkpoint_hash(model)
    cache_file = tmp_path / "cache" / "qwen-ref" / "sha256.json"
    cache = json.loads(cache_file.read_text())
    assert len(cache) == 2
    # a planted value proves the cache is read: the weights are not hashed again while unchanged
    weights_key = next(k for k in cache if "model.safetensors" in k)
    cache_file.write_text(json.dumps(cache | {weights_key: "0" * 64}))
    assert checkpoint_hash(model) != first
    # the weights rewritten with other values (and another mtime): hashed afresh, not taken from the cache
    random_checkpoint(model, small_config(), seed=1)
    st = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    random_checkpoint(tmp_path / "fresh", small_config(), seed=1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-cache"))
    assert checkpoint_hash(tmp_path / "fresh") == checkpoint_hash(model) != first


def test_an_unwritable_cache_still_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-such-place")
    model = tmp_path / "m"
    random_checkpoint(model, small_config())
    assert len(checkpoint_hash(model)) == 64
