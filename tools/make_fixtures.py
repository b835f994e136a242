#!/usr/bin/env python
"""Regenerate all committed reference data: tests/fixtures/<case>/ and qwen_ref/selfcheck_model/.

Each case is a tiny random Qwen2ForCausalLM saved as a Hugging Face checkpoint
(config.json, generation_config.json, *.safetensors) next to reference.npz, which holds what
transformers computes from the weights *as stored* (rounded to the storage dtype, then
widened to float32, eager attention):

    prompt_tokens    int64   [T]        prompt ids
    logit_positions  int64   [P]        prompt positions whose logits are stored (all, or the last one)
    logits           float32 [P, vocab] logits at those positions (row i predicts the token
                                        after position logit_positions[i])
    greedy_tokens    int64   [N']       greedy continuation, new ids only; ends with the eos id
                                        if one stopped it
    max_new_tokens   int64   []         the generation budget N (N' <= N)
    min_margin       float32 []         smallest top-1 minus top-2 logit over the decisive positions
                                        (last prompt position and every greedy step)
    transformers_version, torch_version: 0-d str
    prompt_text      0-d str            only in full_vocab_bf16

Run from the repository root:  python tools/make_fixtures.py
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import lzma
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from qwen_ref.npz import save_npz

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_JSON_XZ = REPO / "tests/data/qwen1.5-tokenizer/tokenizer.json.xz"

# Random-weight scales. Inputs to every projection are RMS-normalised (RMS ~1), so a weight std of
# gain / sqrt(fan_in) gives outputs of RMS ~gain: 2 pushes SiLU and softmax out of their linear
# regimes; 1 on the residual writers (o_proj, down_proj) keeps the residual stream O(1).
IN_GAIN = 2.0
OUT_GAIN = 1.0
EMBED_STD = 0.5  # tied heads: logits std ~0.5 * sqrt(hidden), max |logit| ~5..40 for hidden 16..256
BIAS_STD = 0.3
NORM_WEIGHT_STD = 0.2  # norm weights 1 + 0.2 * randn, so a dropped norm weight shows up

# A case is accepted only if no argmax is close to a tie. Margins are relative to max |logit| at
# that position. Decisive positions (the ones greedy decoding takes an argmax of) get 1e-2, loose
# enough that even bfloat16 activations would pick the same tokens. Other prompt positions get
# 1e-4, still ~100x float32 rounding noise; 1e-2 there is out of reach for random weights
# (about 1 in 10 positions of a random model falls below it).
DECISIVE_MARGIN = 1e-2
PROMPT_MARGIN = 1e-4
MAX_SEED_TRIES = 200

# Qwen1.5 chat prompt and its known tokenization (tests/data/qwen1.5-tokenizer/SOURCE.md).
CHATML_TEXT = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
CHATML_IDS = (151644, 8948, 198, 2610, 525, 264, 10950, 17847, 151645, 198)
QWEN_EOS_IDS = (151643, 151645)  # <|endoftext|>, <|im_end|>


@dataclasses.dataclass(frozen=True)
class Case:
    """One fixture. hidden = heads * head_dim everywhere, as in every Qwen1.5 checkpoint."""

    name: str
    seed: int  # first seed tried, later ones only if a margin is too small (see CASES)
    dtype: torch.dtype  # storage dtype of the safetensors
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    layers: int = 2
    rope_theta: float = 1e6
    eps: float = 1e-6
    prompt_len: int = 16
    max_new_tokens: int = 32
    prompt: tuple[int, ...] | None = None  # fixed prompt ids instead of random ones
    prompt_text: str | None = None
    eos_ids: tuple[int, ...] | None = None  # fixed eos ids instead of two unused ones
    eos_at_step: int | None = None  # make greedy decoding stop on eos at this 1-based step
    stored_positions: int | None = None  # store logits of the last k prompt positions only
    max_shard_size: str | None = None
    qwen15_config: bool = False  # rewrite config.json as the published Qwen1.5 checkpoints have it
    selfcheck: bool = False  # goes to qwen_ref/selfcheck_model/ instead of tests/fixtures/

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
# Each seed is where the search, started from a round number (100, 200, ...), first passed, so a
# rerun builds each model once instead of retrying up to ~120 seeds.
CASES = (
    Case("mha_f32_untied", 101, F32, 4, 4, 16, 96, 512, tied=False),
    Case("gqa40x8_bf16_tied", 201, BF16, 10, 2, 16, 200, 256, tied=True),
    Case("mqa_f16", 403, F16, 4, 1, 32, 96, 512, tied=False),
    Case("hd128_bf16", 407, BF16, 2, 1, 128, 48, 256, tied=True),
    Case("hd64_sharded_bf16", 523, BF16, 4, 2, 64, 48, 256, tied=False, layers=2,
         max_shard_size="400KB"),
    Case("odd_sizes_f32", 604, F32, 3, 1, 14, 77, 301, tied=True, rope_theta=5e6, eps=1e-5),
    Case("long_seq_bf16", 716, BF16, 4, 2, 16, 96, 256, tied=False, prompt_len=320),
    Case("eos_stop_f32", 800, F32, 2, 2, 16, 48, 256, tied=False, eos_at_step=6),
    Case("qwen15_config_style", 940, BF16, 4, 2, 16, 96, 512, tied=False, qwen15_config=True),
    Case("full_vocab_bf16", 1146, BF16, 2, 1, 4, 24, 151936, tied=True, prompt=CHATML_IDS,
         prompt_text=CHATML_TEXT, eos_ids=QWEN_EOS_IDS, max_new_tokens=24, stored_positions=1),
    Case("selfcheck", 1117, BF16, 4, 2, 16, 96, 1000, tied=True, prompt_len=12, selfcheck=True),
)


@dataclasses.dataclass(frozen=True)
class Reference:
    prompt_logits: np.ndarray  # [T, vocab] float32
    step_logits: np.ndarray  # [N', vocab] float32; row 0 is the last prompt position
    greedy: np.ndarray  # [N'] int64


def build_model(case: Case, seed: int) -> Qwen2ForCausalLM:
    """Random model whose float32 weights are exactly representable in case.dtype."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=case.vocab,
        hidden_size=case.hidden,
        intermediate_size=case.intermediate,
        num_hidden_layers=case.layers,
        num_attention_heads=case.heads,
        num_key_value_heads=case.kv_heads,
        head_dim=case.head_dim,
        rope_theta=case.rope_theta,
        rms_norm_eps=case.eps,
        tie_word_embeddings=case.tied,
        attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        # named_parameters() lists a tied lm_head once, as model.embed_tokens.weight
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + NORM_WEIGHT_STD * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(BIAS_STD * torch.randn_like(param))
            elif name == "model.embed_tokens.weight":
                param.copy_(EMBED_STD * torch.randn_like(param))
            else:
                gain = OUT_GAIN if name.endswith(("o_proj.weight", "down_proj.weight")) else IN_GAIN
                param.copy_(gain / param.shape[1] ** 0.5 * torch.randn_like(param))
        # round through the storage dtype so the search sees the weights the reload will see;
        # parameters only: model.to(dtype) would also round the RoPE inv_freq buffer
        for param in model.parameters():
            param.copy_(param.to(case.dtype))
    return model


def run_reference(model: Qwen2ForCausalLM, prompt: np.ndarray, generation_config: GenerationConfig,
                  max_new_tokens: int) -> Reference:
    ids = torch.from_numpy(prompt)[None]  # [1, T]
    generation_config = copy.deepcopy(generation_config)
    generation_config.update(max_new_tokens=max_new_tokens, output_logits=True,
                             return_dict_in_generate=True)
    with torch.no_grad():
        prompt_logits = model(ids).logits[0].numpy()  # [T, vocab]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=generation_config,
        )
    step_logits = torch.cat(out.logits).numpy()  # [N', vocab]
    return Reference(prompt_logits, step_logits, out.sequences[0, len(prompt):].numpy())


def top1_margins(logits: np.ndarray) -> np.ndarray:
    """[n, vocab] -> [n] top-1 minus top-2 logit."""
    top2 = np.partition(logits, -2, axis=-1)[:, -2:]  # [n, 2]
    return top2[:, 1] - top2[:, 0]


def relative_margins(logits: np.ndarray) -> np.ndarray:
    """[n, vocab] -> [n] top-1 margin as a fraction of max |logit| at that position."""
    return top1_margins(logits) / np.abs(logits).max(axis=-1)


def margins_ok(ref: Reference) -> bool:
    return bool(relative_margins(ref.step_logits).min() >= DECISIVE_MARGIN
                and relative_margins(ref.prompt_logits).min() >= PROMPT_MARGIN)


def agrees(a: Reference, b: Reference) -> bool:
    """Same greedy tokens; logits equal up to float32 summation-order noise.

    Not bitwise: from_pretrained keeps a float32 checkpoint as unaligned views of the file, which
    sends the matmuls down another vector path than the in-memory model (~1e-6 relative)."""
    def close(x: np.ndarray, y: np.ndarray) -> bool:
        return x.shape == y.shape and bool(np.abs(x - y).max() <= 1e-5 * np.abs(y).max())

    return (np.array_equal(a.greedy, b.greedy) and close(a.prompt_logits, b.prompt_logits)
            and close(a.step_logits, b.step_logits))


def draw_prompt(case: Case, seed: int) -> np.ndarray:
    if case.prompt is not None:
        return np.array(case.prompt, dtype=np.int64)
    return np.random.default_rng(seed).integers(0, case.vocab, size=case.prompt_len, dtype=np.int64)


def pick_eos(case: Case, prompt: np.ndarray, greedy: np.ndarray) -> tuple[int, ...] | None:
    """eos ids for generation_config.json, or None if this draw cannot use them.

    `greedy` is the continuation generated without any eos."""
    if case.eos_ids is not None:
        return None if np.isin(greedy, case.eos_ids).any() else case.eos_ids
    used = set(prompt.tolist()) | set(greedy.tolist())
    unused = [i for i in range(case.vocab - 1, -1, -1) if i not in used]
    if case.eos_at_step is None:
        return tuple(unused[:2])
    stop = int(greedy[case.eos_at_step - 1])
    if stop in prompt or stop in greedy[: case.eos_at_step - 1]:
        return None
    # the stopping id second, so reading only eos_token_id[0] is caught
    return unused[0], stop


def generation_config(eos: tuple[int, ...] | None) -> GenerationConfig:
    # Qwen1.5 style: <|endoftext|> (here the first eos id) doubles as bos and pad
    pad = eos[0] if eos else None
    return GenerationConfig(bos_token_id=pad, eos_token_id=list(eos) if eos else None,
                            pad_token_id=pad, do_sample=False)


def search(case: Case) -> tuple[int, np.ndarray, tuple[int, ...], Reference]:
    """First seed from case.seed on whose prompt, greedy steps and eos choice pass the checks.

    Runs the in-memory model without eos, and returns what the saved checkpoint must reproduce."""
    for seed in range(case.seed, case.seed + MAX_SEED_TRIES):
        prompt = draw_prompt(case, seed)
        model = build_model(case, seed)
        ref = run_reference(model, prompt, generation_config(None), case.max_new_tokens)
        eos = pick_eos(case, prompt, ref.greedy)
        # once eos is set, generation stops after eos_at_step tokens: later steps do not count
        steps = slice(case.eos_at_step)
        ref = Reference(ref.prompt_logits, ref.step_logits[steps], ref.greedy[steps])
        if eos is not None and margins_ok(ref):
            return seed, prompt, eos, ref
    raise RuntimeError(f"{case.name}: no seed in {MAX_SEED_TRIES} tries has clear top-1 margins")


def load_reference_model(path: Path) -> Qwen2ForCausalLM:
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def rewrite_as_qwen15(path: Path, eos: tuple[int, ...]) -> None:
    """config.json as the published Qwen1.5 checkpoints have it (written by transformers 4.37)."""
    cfg = json.loads((path / "config.json").read_text())
    qwen15 = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": eos[0],
        "eos_token_id": eos[0],
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "model_type": "qwen2",
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "rms_norm_eps": cfg["rms_norm_eps"],
        "rope_theta": cfg["rope_parameters"]["rope_theta"],
        "sliding_window": 32768,
        "tie_word_embeddings": cfg["tie_word_embeddings"],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.37.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": cfg["vocab_size"],
    }
    (path / "config.json").write_text(json.dumps(qwen15, indent=2) + "\n")


def check_tokenization(case: Case) -> None:
    tokenizer_json = lzma.decompress(TOKENIZER_JSON_XZ.read_bytes()).decode()
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    ids = tokenizer.encode(case.prompt_text, add_special_tokens=False).ids
    if tuple(ids) != case.prompt:
        raise RuntimeError(f"{case.name}: tokenizer gives {ids}, expected {list(case.prompt)}")


def make_case(case: Case, path: Path) -> str:
    """Write one case folder; return its summary line."""
    if case.prompt_text is not None:
        check_tokenization(case)
    seed, prompt, eos, expected = search(case)

    model = build_model(case, seed).to(case.dtype)
    model.config.bos_token_id = eos[0]
    model.config.eos_token_id = list(eos)
    model.generation_config = generation_config(eos)
    shutil.rmtree(path, ignore_errors=True)
    save_kwargs = {"max_shard_size": case.max_shard_size} if case.max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    # safetensors 0.8 creates its files with mode 0600; installed package data must be readable
    for weights in path.glob("*.safetensors"):
        weights.chmod(0o644)

    # the reference comes from the checkpoint on disk, with its own generation_config.json
    gen_config = GenerationConfig.from_pretrained(path)
    ref = run_reference(load_reference_model(path), prompt, gen_config, case.max_new_tokens)
    if case.qwen15_config:
        rewrite_as_qwen15(path, eos)
        again = run_reference(load_reference_model(path), prompt, gen_config, case.max_new_tokens)
        # same weights through the same loader: must be bitwise equal
        if not (np.array_equal(again.prompt_logits, ref.prompt_logits)
                and np.array_equal(again.greedy, ref.greedy)):
            raise RuntimeError(f"{case.name}: the Qwen1.5-style config.json changes the model")
    if not (agrees(ref, expected) and margins_ok(ref)):
        raise RuntimeError(f"{case.name}: the saved checkpoint disagrees with the in-memory model")

    positions = np.arange(len(prompt), dtype=np.int64)[-(case.stored_positions or len(prompt)):]
    min_margin = top1_margins(ref.step_logits).min()
    arrays = {
        "prompt_tokens": prompt,
        "logit_positions": positions,
        "logits": ref.prompt_logits[positions].astype(np.float32),
        "greedy_tokens": ref.greedy.astype(np.int64),
        "max_new_tokens": np.int64(case.max_new_tokens),
        "min_margin": np.float32(min_margin),
        "transformers_version": np.array(transformers.__version__),
        "torch_version": np.array(torch.__version__),
    }
    if case.prompt_text is not None:
        arrays["prompt_text"] = np.array(case.prompt_text)
    save_npz(path / "reference.npz", arrays, compress=True)

    n_params = sum(p.numel() for p in model.parameters())
    files = " ".join(f"{f.name}={f.stat().st_size / 1024:.1f}K" for f in sorted(path.iterdir()))
    return (f"{case.name:20s} seed={seed} params={n_params:,} greedy={len(ref.greedy)} "
            f"max|logit|={np.abs(ref.step_logits).max():.1f} min_margin={min_margin:.3f} "
            f"(relative {relative_margins(ref.step_logits).min():.3f}, "
            f"prompt {relative_margins(ref.prompt_logits).min():.1e}) | {files}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", type=Path, default=REPO / "tests/fixtures",
                        help="where the test cases go (default: %(default)s)")
    parser.add_argument("--selfcheck", type=Path, default=REPO / "qwen_ref/selfcheck_model",
                        help="where the packaged selfcheck checkpoint goes (default: %(default)s)")
    args = parser.parse_args()

    # one thread: fixed float summation order, and fastest at these sizes
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    for case in CASES:
        path = args.selfcheck if case.selfcheck else args.fixtures / case.name
        print(make_case(case, path), flush=True)
    print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
