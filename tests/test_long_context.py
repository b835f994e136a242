"""Long prompts: RoPE against transformers at positions 30,000 to 32,767, a 32,000-token prompt from a
file through `qwen-ref logits --last 4`, and memory that grows with the prefill chunk, not the prompt.

transformers' eager attention over a 32K prompt needs [heads, 32K, 32K] float32 scores (4 GB per
head), so the RoPE tables are compared on a short sequence whose positions start at 30,000, as
transformers runs it when given `position_ids`: both sides compute the same function (the tokens
attend only to each other, rotated at positions 30,000+), and RoPE meets the angles of the end of
the context, where an ulp of a frequency is worth 2e-3 rad. The whole 32,000-token prompt is
compared with transformers' sdpa attention, which computes the same float32 softmax blockwise.
"""

import subprocess
import sys

import numpy as np
import pytest
from helpers import random_checkpoint, small_config, transformers_random_model

import qwen_ref.model
from qwen_ref.backends import BACKEND_NAMES, get_backend
from qwen_ref.compare import compare_logits
from qwen_ref.model import load_model
from qwen_ref.rope import rope_cos_sin, rope_inv_freq

FIRST_POSITION = 30_000
CONTEXT = 32_768  # max_position_embeddings of every Qwen1.5 checkpoint
# (head_dim, rope_theta) of the published RoPE tables: Qwen1.5-0.5B; 1.8B, 7B, 14B, 32B, 72B; 4B
ROPE_TABLES = [(64, 1e6), (128, 1e6), (128, 5e6)]


def test_inv_freq_is_correctly_rounded_and_off_transformers_only_where_torch_misrounds_a_near_tie(torch_reference):
    torch, transformers = torch_reference
    mpmath = pytest.importorskip("mpmath")  # installed with torch (through sympy)
    mpmath.mp.prec = 113
    rotary = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding
    differing = 0
    for head_dim in (4, 14, 16, 64, 80, 128, 256):
        for theta in (1e4, 1e6, 5e6, 1e7):
            config = transformers.Qwen2Config(hidden_size=64, num_attention_heads=2, head_dim=head_dim,
                                              rope_theta=theta)
            theirs = rotary.compute_default_rope_parameters(config)[0].numpy()  # [hd/2]
            ours = rope_inv_freq(head_dim, theta)  # [hd/2]
            for i, x in enumerate(np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)):
                power = mpmath.mpf(float(np.float32(theta))) ** mpmath.mpf(float(x))  # theta^x, exact enough
                below = np.float32(float(power))
                below = below if mpmath.mpf(float(below)) <= power else np.nextafter(below, np.float32(0))
                above = np.nextafter(below, np.float32(np.inf))
                share = (power - mpmath.mpf(float(below))) / (mpmath.mpf(float(above)) - mpmath.mpf(float(below)))
                nearest = below if share < 0.5 else above  # where theta^x lies between its float32 neighbours
                assert ours[i] == np.float32(1) / nearest, (head_dim, theta, i)
                if theirs[i] != ours[i]:
                    differing += 1
                    # PyTorch's float32 pow rounds the other way only where it is nearly a tie
                    other_neighbour = above if nearest == below else below
                    assert abs(share - 0.5) < 0.1 and theirs[i] == np.float32(1) / other_neighbour
    assert differing < 20  # 7 of these 1,124 frequencies with torch 2.13 on AVX2: rare, not the rule


@pytest.fixture(scope="module", params=ROPE_TABLES, ids=lambda t: f"hd{t[0]}-theta{t[1]:g}")
def end_of_context(request, torch_reference, tmp_path_factory):
    """A random 2-layer GQA model with a published RoPE table, the token ids, and transformers' logits at
    positions 30,000 to 32,767 (float32, eager)."""
    torch, transformers = torch_reference
    head_dim, theta = request.param
    config = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=head_dim, rope_theta=theta, max_position_embeddings=CONTEXT,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    model_dir = tmp_path_factory.mktemp("end_of_context")
    transformers_random_model(torch, transformers, config, seed=head_dim).save_pretrained(model_dir)
    model = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], CONTEXT - FIRST_POSITION)  # [T]
    positions = torch.arange(FIRST_POSITION, CONTEXT)[None]  # [1, T]: up to the last position of the context
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(tokens)[None], position_ids=positions).logits[0].numpy()  # [T, V]
    return model_dir, tokens, ref


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
def test_logits_at_positions_30000_to_32767_agree_with_transformers(end_of_context, backend_name, monkeypatch):
    model_dir, tokens, ref = end_of_context
    # the same tokens, rotated at positions 30,000+ as transformers' position_ids put them
    monkeypatch.setattr(qwen_ref.model, "rope_cos_sin",
                        lambda positions, inv_freq: rope_cos_sin(positions + FIRST_POSITION, inv_freq))
    model = load_model(model_dir, get_backend(backend_name))
    ours = model.forward(tokens, model.new_cache(len(tokens)))  # [T, V]
    report = compare_logits(ref, ours)
    # RoPE's float32 differences from transformers must stay a small part of the tolerance. Measured on an
    # AVX-512 Xeon: 0.016-0.022 of it with theta 1e6; with theta 5e6 (Qwen1.5-4B), where PyTorch's float32
    # pow rounds one near-tie the other way, 0.089 (numpy) and 0.099 (numba, another summation order).
    # 0.2 leaves room for other CPUs' summation order and still fails the old frequencies (3.6x).
    assert report.max_abs_diff <= 0.2 * report.tolerance, report.summary()
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * report.tolerance  # elsewhere either order is within tolerance
    assert clear.mean() > 0.9 and np.array_equal(ref.argmax(-1)[clear], ours.argmax(-1)[clear]), report.summary()


# `qwen-ref ARGS` in a process that prints its peak resident memory (MB) as the last line of stderr. VmHWM,
# not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest, ~1 GB with torch).
_PEAK_RSS = ("import re, sys; from qwen_ref.cli import main; code = main(sys.argv[1:]); "
             "peak = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
             "print(int(peak) // 1024, file=sys.stderr); sys.exit(code)")


def peak_rss_mb(*args) -> int:
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(result.stderr.split()[-1])


def test_attention_scratch_grows_with_the_prefill_chunk_not_the_prompt(tmp_path):
    # The numpy attention holds the scores of a chunk's queries against every key so far: [H, chunk, T]
    heads, n_tokens = 16, 3000
    random_checkpoint(tmp_path, small_config(hidden_size=64, num_attention_heads=heads, num_key_value_heads=4,
                                             max_position_embeddings=4096))
    (tmp_path / "ids.txt").write_text(" ".join(map(str, np.random.default_rng(0).integers(0, 97, n_tokens))))
    args = ["logits", "--model", tmp_path, "--tokens-file", tmp_path / "ids.txt", "--out", tmp_path / "x.npz",
            "--backend", "numpy", "--quiet"]
    large, small = peak_rss_mb(*args, "--prefill-chunk", 512), peak_rss_mb(*args, "--prefill-chunk", 128)
    one_score_array = heads * (512 - 128) * n_tokens * 4 / 2**20  # 70 MB: float32 [H, 384, T]
    assert large - small >= one_score_array, (large, small)


@pytest.fixture(scope="module")
def prompt_of_32000_tokens(tmp_path_factory):
    """A tiny random model with a 32,768-token context (head_dim 16), a file of 32,000 token ids, and what
    `qwen-ref logits --tokens-file FILE --last 4` wrote for it: (model folder, ids, the .npz, peak memory in MB)."""
    folder = tmp_path_factory.mktemp("prompt_32k")
    model = folder / "model"
    random_checkpoint(model, small_config(max_position_embeddings=CONTEXT, num_attention_heads=2,
                                          num_key_value_heads=1))
    ids = np.random.default_rng(1).integers(0, 97, 32_000)  # [T]
    rows = [", ".join(map(str, row)) for row in ids.reshape(-1, 1000)]  # commas within lines, newlines between
    (folder / "ids.txt").write_text("\n".join(rows) + "\n")
    out = folder / "last4.npz"
    peak = peak_rss_mb("logits", "--model", model, "--tokens-file", folder / "ids.txt", "--last", 4, "--out", out,
                       "--quiet")
    return model, ids, np.load(out), peak


def test_a_32000_token_prompt_file_gives_its_last_4_positions_in_bounded_memory(prompt_of_32000_tokens):
    _, ids, saved, peak = prompt_of_32000_tokens
    assert np.array_equal(saved["tokens"], ids)
    assert np.array_equal(saved["positions"], np.arange(31_996, 32_000))
    assert saved["logits"].shape == (4, 97) and np.isfinite(saved["logits"]).all()
    # one head's [T, T] float32 scores alone would be 4 GB; the weights, the 8 MB cache and Numba take ~160 MB
    assert peak < 1024, peak


def test_the_last_positions_of_a_32000_token_prompt_agree_with_transformers(prompt_of_32000_tokens, torch_reference):
    torch, transformers = torch_reference
    model_dir, ids, saved, _ = prompt_of_32000_tokens
    model = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(ids)[None], logits_to_keep=4).logits[0].numpy()  # [4, V]
    report = compare_logits(ref, saved["logits"], row_positions=saved["positions"])
    assert report.ok, report.summary()
