"""Recipe: a suite's cases through transformers, written as the JSONL `qwen-ref suite check` judges.

    python tools/suite_outputs_transformers.py SUITE_DIR MODEL_DIR --out outputs.jsonl
    qwen-ref suite check SUITE_DIR outputs.jsonl

Qwen2ForCausalLM in float32 with eager attention (the numerical specification qwen-ref follows), each
case's token ids from SUITE_DIR/cases.jsonl in one forward pass, teacher-forced; log_softmax of its
float32 logits taken in float64; per position the --top-n most likely tokens (default 2K, so that a
reference top-K token is rarely outside the list). The first line states the tokenizer as
transformers' own AutoTokenizer loads it from MODEL_DIR (special tokens, eos/bos/pad ids) and the
sha256 of its files, for `suite check` to compare with the reference's.
tests/test_suite.py runs this script; a float32 engine on the same weights comes out exact.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

from qwen_ref.fingerprint import tokenizer_hash
from qwen_ref.suite_engine import engine_line, tokenizer_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("suite", type=Path, help="the folder `qwen-ref suite make` wrote")
    parser.add_argument("model", type=Path, help="the checkpoint folder, with its tokenizer")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL to write")
    parser.add_argument("--top-n", type=int, help="tokens listed per position (default: twice the suite's top-K)")
    args = parser.parse_args()

    top_k = json.loads((args.suite / "manifest.json").read_text())["top_k"]
    cases = [json.loads(line) for line in (args.suite / "cases.jsonl").read_text().splitlines() if line]
    model = transformers.Qwen2ForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    special = {t.content: i for i, t in sorted(tok.added_tokens_decoder.items()) if t.special}
    lines = [tokenizer_line(sha256=tokenizer_hash(args.model), special_tokens=special,
                            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                            pad_token_id=tok.pad_token_id)]
    with torch.no_grad():
        for case in cases:
            logits = model(torch.tensor([case["tokens"]])).logits[0]  # [T, V] float32
            logprobs = torch.log_softmax(logits.double(), dim=-1).numpy()  # [T, V]
            lines.append(engine_line(case["id"], case["tokens"], logprobs, args.top_n or 2 * top_k))
    args.out.write_text("".join(lines))


if __name__ == "__main__":
    main()
