import json
import mmap
import re

import numpy as np
import pytest
from helpers import bf16_words, random_checkpoint, small_config, write_safetensors

from qwen_ref.config import QwenConfig
from qwen_ref.errors import QwenRefError
from qwen_ref.model import load_model
from qwen_ref.weights import load_weights, read_safetensors, to_float32


def test_bf16_widening_is_exact_for_every_word():
    words = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    widened = to_float32(words)
    # bfloat16 is the high half of a float32: widening must put the word there and zero the low half
    assert np.array_equal(widened.view(np.uint32), words.astype(np.uint32) << 16)


def test_weights_stay_memory_mapped_in_their_stored_dtype(tmp_path):
    random_checkpoint(tmp_path, small_config(), dtype="BF16")
    model = load_model(tmp_path)
    q = model.weights["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == np.uint16 and not q.flags.writeable
    base = q
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)  # a view of the file, no copy


def test_tied_checkpoint_uses_embeddings_with_or_without_lm_head(tmp_path):
    config = small_config(tie_word_embeddings=True)
    random_checkpoint(tmp_path, config)
    model = load_model(tmp_path)
    assert model.lm_head is model.weights["model.embed_tokens.weight"]
    embeddings = np.array(model.lm_head)  # a copy: the file is rewritten below, under the memory map
    # a tied checkpoint that also stores lm_head.weight loads too; transformers ignores that copy
    tensors = {n: ("F32", np.asarray(a)) for n, a in read_safetensors(tmp_path / "model.safetensors").items()}
    tensors["lm_head.weight"] = ("F32", np.zeros((97, 32), np.float32))
    write_safetensors(tmp_path / "model.safetensors", tensors)
    assert np.array_equal(load_model(tmp_path).lm_head, embeddings)


def test_sharded_checkpoint_loads_every_shard(tmp_path):
    random_checkpoint(tmp_path, small_config())
    tensors = read_safetensors(tmp_path / "model.safetensors")
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, part in shards.items():
        write_safetensors(tmp_path / file, {n: ("F32", np.asarray(tensors[n])) for n in part})
    (tmp_path / "model.safetensors").unlink()
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_weights(tmp_path, QwenConfig.from_dict(small_config()))
    assert sorted(loaded) == names and all(np.array_equal(loaded[n], tensors[n]) for n in names)


def _rewrite(tmp_path, edit):
    tensors = {n: ("F32", np.asarray(a)) for n, a in read_safetensors(tmp_path / "model.safetensors").items()}
    edit(tensors)
    write_safetensors(tmp_path / "model.safetensors", tensors)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "'model.layers.1.mlp.up_proj.weight' is missing"),
        (lambda t: t.update({"model.layers.9.extra": ("F32", np.zeros(3))}), "unexpected tensor 'model.layers.9.extra'"),
        (lambda t: t.update({"model.norm.weight": ("F32", np.zeros(31))}), r"'model.norm.weight' has shape \[31\]"),
    ],
)
def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path, edit, message):
    random_checkpoint(tmp_path, small_config())
    _rewrite(tmp_path, edit)
    with pytest.raises(QwenRefError, match=message):
        load_model(tmp_path)


def test_truncated_file_names_file_and_tensor(tmp_path):
    random_checkpoint(tmp_path, small_config())
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(QwenRefError, match=r"model.safetensors: tensor '.*': truncated file: data_offsets end at byte"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x05\x00", "truncated safetensors file"),
        ((10**9).to_bytes(8, "little") + b"{}", "corrupt safetensors header"),
        ((8).to_bytes(8, "little") + b"not json", "corrupt safetensors header"),
        ((2).to_bytes(8, "little") + b"[]", "corrupt safetensors header"),
    ],
)
def test_corrupt_headers_raise_one_clear_error(tmp_path, content, message):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(QwenRefError, match=message):
        read_safetensors(tmp_path / "model.safetensors")


def test_unsupported_dtype_is_refused(tmp_path):
    header = json.dumps({"x": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(QwenRefError, match="dtype \"I64\" is not supported"):
        read_safetensors(tmp_path / "model.safetensors")


def _with_entry(tmp_path, body=8, **fields):
    """A one-tensor file (two float32 values) whose header entry has `fields` replaced."""
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    entry.update(fields)
    header = json.dumps({"w": entry}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(body))
    return path


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"dtype": ["F32"]}, "tensor 'w': dtype must be a string, not [\"F32\"]"),
        ({"dtype": None}, "tensor 'w': dtype must be a string, not null"),
        ({"shape": "2"}, "tensor 'w': shape must be a list of non-negative integers, not \"2\""),
        ({"shape": None}, "tensor 'w': shape must be a list of non-negative integers, not null"),
        ({"shape": {"0": 2}}, "shape must be a list of non-negative integers"),
        ({"shape": [2.0]}, "shape must be a list of non-negative integers"),
        ({"shape": [True, 2]}, "shape must be a list of non-negative integers"),
        ({"shape": [-1, -2]}, "shape must be a list of non-negative integers"),
        ({"shape": [0, 2**80]}, "data_offsets give 8 bytes, shape [0, 1208925819614629174706176] F32 needs 0"),
        ({"data_offsets": "0,8"}, "tensor 'w': data_offsets must be two integers"),
        ({"data_offsets": [0, 8, 16]}, "data_offsets must be two integers"),
        ({"data_offsets": [8, 0]}, "0 <= begin <= end"),
        ({"data_offsets": [-8, 0]}, "0 <= begin <= end"),
        ({"data_offsets": [0, 2**70]}, "truncated file: data_offsets end at byte 1180591620717411303424 of 8"),
        ({"data_offsets": [4, 8], "shape": [1]}, "tensor 'w' (data_offsets [4, 8]) leaves a gap after the start"),
        ({"data_offsets": [0, 4], "shape": [1]}, "4 bytes after the last tensor's data"),
    ],
)
def test_each_header_field_is_checked_and_named(tmp_path, fields, message):
    with pytest.raises(QwenRefError, match=re.escape(message)):
        read_safetensors(_with_entry(tmp_path, **fields))


def test_empty_tensor_with_more_dimensions_than_numpy_allows_is_refused(tmp_path):
    path = _with_entry(tmp_path, body=0, shape=[0] + [1] * 70, data_offsets=[0, 0])
    with pytest.raises(QwenRefError, match="tensor 'w' has an unusable shape"):
        read_safetensors(path)


def test_overlapping_tensors_are_refused(tmp_path):
    header = json.dumps({
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(QwenRefError, match=re.escape("tensor 'b' (data_offsets [4, 12]) overlaps tensor 'a'")):
        read_safetensors(path)


def test_missing_field_and_non_object_entry_are_named(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(QwenRefError, match="tensor 'w': header entry has no 'data_offsets'"):
        read_safetensors(path)
    header = json.dumps({"w": [1, 2]}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(QwenRefError, match=re.escape("tensor 'w': header entry must be an object, not [1, 2]")):
        read_safetensors(path)


def test_integer_too_long_for_python_is_a_corrupt_header_not_a_crash(tmp_path):
    header = b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}'
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(QwenRefError, match="corrupt safetensors header"):
        read_safetensors(tmp_path / "model.safetensors")


def test_deeply_nested_header_is_a_corrupt_header_not_a_crash(tmp_path):
    header = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(QwenRefError, match="corrupt safetensors header"):
        read_safetensors(tmp_path / "model.safetensors")


def test_folder_without_weights_or_with_only_bin_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(small_config()))
    with pytest.raises(QwenRefError, match=r"no \*.safetensors weights$"):
        load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(QwenRefError, match="bin checkpoints are not supported"):
        load_model(tmp_path)


def test_shard_index_naming_a_missing_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(small_config()))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(QwenRefError, match="names shard gone.safetensors"):
        load_model(tmp_path)


def test_weights_stored_in_mixed_dtypes_are_refused_by_name(tmp_path):
    random_checkpoint(tmp_path, small_config(), dtype="BF16")
    # same byte size, so every header check passes: the numba kernels would be handed f16 biases
    _rewrite_dtype(tmp_path / "model.safetensors", "model.layers.1.self_attn.k_proj.bias", "F16")
    with pytest.raises(QwenRefError, match="'model.layers.1.self_attn.k_proj.bias' is F16 but "
                                           "'model.embed_tokens.weight' is BF16: every weight must be stored in one dtype"):
        load_model(tmp_path)


def _rewrite_dtype(path, name, dtype):
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    header[name]["dtype"] = dtype
    text = json.dumps(header).encode()
    text += b" " * (n - len(text))  # same header length: the data offsets stay right
    path.write_bytes(blob[:8] + text + blob[8 + n :])


@pytest.mark.parametrize("index", ["[" * 100_000 + "]" * 100_000, '{"weight_map": {"a": ' + "7" * 5000 + "}}", "{"])
def test_unreadable_shard_index_is_one_clear_error(tmp_path, index):
    (tmp_path / "config.json").write_text(json.dumps(small_config()))
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(QwenRefError, match="unreadable shard index"):
        load_model(tmp_path)


def test_shard_index_naming_a_path_outside_the_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(small_config()))
    index = {"weight_map": {"a": "../model.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(QwenRefError, match="shard name '../model.safetensors' is not a file name"):
        load_model(tmp_path)


def test_bf16_test_writer_rounds_to_nearest_even():
    # guards the helper every bf16 test depends on: 1 + 2^-8 is a tie and rounds to even (1.0)
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5], np.float32)
    assert np.array_equal(to_float32(bf16_words(x)), np.array([1.0, 1.0, 1.0 + 2**-6, -2.5], np.float32))
