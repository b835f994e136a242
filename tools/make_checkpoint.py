"""Write a random-weight Qwen2ForCausalLM checkpoint of a real Qwen1.5 shape with transformers.

For memory and speed measurements on the exact shapes people run, without downloading weights:
    python tools/make_checkpoint.py --shape 0.5b --dtype bfloat16 --out /tmp/qwen1.5-0.5b-bf16
Needs the `reference` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "tests" / "data" / "qwen1.5-tokenizer"

# The published Qwen1.5 configs (hidden, intermediate, layers, heads, kv heads, tied head), and
# `tiny` for smoke tests of the tools that use them: 10M parameters, grouped-query attention, and
# the full vocabulary, so that the tokenizer still fits.
SHAPES = {
    "0.5b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, tie_word_embeddings=True),
    "1.8b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}


def make_checkpoint(shape: str, dtype: str, out: Path, seed: int = 0) -> None:
    shape_fields = {"vocab_size": 151936, **SHAPES[shape]}
    config = Qwen2Config(
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        bos_token_id=151643, eos_token_id=151643, **shape_fields,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643], do_sample=False)
    model.save_pretrained(out)
    (out / "tokenizer.json").write_bytes(lzma.decompress((TOKENIZER / "tokenizer.json.xz").read_bytes()))
    shutil.copyfile(TOKENIZER / "tokenizer_config.json", out / "tokenizer_config.json")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"out": str(out), "shape": shape, "dtype": dtype, "safetensors_bytes": size}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_checkpoint(args.shape, args.dtype, args.out, args.seed)


if __name__ == "__main__":
    main()
