"""Live: transformers loads what tools/make_checkpoint.py writes with NumPy (names, shapes, dtypes, shard index:
no key missing, unexpected or mismatched) and computes the logits qwen-ref computes from it; the shards are
cut as huggingface_hub cuts them. Runs wherever the `reference` extra is installed; CI requires it."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import small_config

from qwen_ref.backends import get_backend
from qwen_ref.compare import compare_logits
from qwen_ref.config import QwenConfig
from qwen_ref.model import load_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import make_checkpoint  # noqa: E402


def _tiny(out: Path, dtype: str, shard_gb: float) -> None:
    result = subprocess.run([sys.executable, str(REPO / "tools" / "make_checkpoint.py"), "--shape", "tiny",
                             "--dtype", dtype, "--shard-gb", str(shard_gb), "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _untied(out: Path, dtype: str, shard_gb: float) -> None:
    config = small_config(tie_word_embeddings=False, torch_dtype=dtype, vocab_size=10_000)
    make_checkpoint.write_checkpoint(out, config, shard_bytes=int(shard_gb * 1e9))


@pytest.mark.parametrize(
    "write, dtype, shard_gb, n_files",
    [
        (_tiny, "bfloat16", 5, 1),  # the tool's default: one model.safetensors
        (_tiny, "float32", 0.01, 2),  # the 39 MB embedding alone, then the rest: an index
        (_untied, "float16", 0.0005, 3),  # the 640 kB embedding and lm_head each alone, then the layers
    ],
)
def test_transformers_loads_the_numpy_written_checkpoint_and_agrees(torch_reference, tmp_path, write, dtype,
                                                                   shard_gb, n_files):
    torch, transformers = torch_reference
    out = tmp_path / "m"
    write(out, dtype, shard_gb)
    assert len(list(out.glob("*.safetensors"))) == n_files
    assert (out / "model.safetensors.index.json").is_file() == (n_files > 1)
    model, loading = transformers.Qwen2ForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(loading.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading

    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 24)
    with torch.no_grad():
        ref = model.eval()(torch.tensor(tokens)[None]).logits[0].numpy()  # [T, V]
    ours = load_model(out, get_backend("numpy"))
    logits = ours.forward(tokens, ours.new_cache(len(tokens)))  # [T, V]
    report = compare_logits(ref, logits)
    # README's tolerance: 1e-4 x max(1, max |reference logit|), float32 summation order apart
    assert report.max_abs_diff <= report.tolerance, report.summary()
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * report.tolerance  # a near-tie may go either way within tolerance
    assert clear.sum() > len(tokens) // 2, report.summary()
    assert np.array_equal(ref.argmax(-1)[clear], logits.argmax(-1)[clear]), report.summary()


@pytest.mark.parametrize("shape, layers, shard_gb", [("14b", None, 5), ("110b", None, 2), ("32b", 2, 1),
                                                     ("tiny", None, 0.0001)])
def test_shards_are_cut_as_huggingface_hub_cuts_them(torch_reference, shape, layers, shard_gb):
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    config = make_checkpoint.config_json(shape, "bfloat16", layers)
    tensors = make_checkpoint.tensor_order(QwenConfig.from_dict(config))
    ours = make_checkpoint.plan_shards(tensors, 2, int(shard_gb * 1e9))
    hub = split_state_dict_into_shards_factory(
        tensors, get_storage_size=lambda shape: 2 * math.prod(shape), filename_pattern="model{suffix}.safetensors",
        max_shard_size=int(shard_gb * 1e9))
    assert dict(zip(make_checkpoint.shard_names(len(ours)), ours, strict=True)) == hub.filename_to_tensors
