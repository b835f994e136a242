"""Recipe: a suite's cases through llama.cpp (llama-cpp-python), written as the JSONL `qwen-ref suite check` judges.

    pip install llama-cpp-python
    python tools/suite_outputs_llamacpp.py SUITE_DIR model.gguf --out outputs.jsonl
    qwen-ref suite check SUITE_DIR outputs.jsonl

Not tested with the real library: llama-cpp-python is installed neither in CI nor in the development
venv. It was written against the llama-cpp-python 0.3.36 source (`Llama.eval` fills
`Llama.scores[n_past:n_past+n]` with every position's logits when the model is opened with
logits_all=True; `Llama.reset` starts a new sequence); tests/test_suite.py runs it against a stand-in
with that interface, which tests this script's logic and not llama.cpp. Check those names first if it
fails on another version.

Each case's token ids from SUITE_DIR/cases.jsonl are evaluated as given (never re-tokenized, so no BOS
is added), from an empty context; the logits of every position are turned into log-probabilities
(log_softmax in float64) and the --top-n most likely are written per position. The GGUF file holds
its own copy of the vocabulary, whose hash cannot match the reference's tokenizer.json, so the first
line states what can be compared: the ids llama.cpp gives the reference's special tokens and its eos
id. A GGUF converted with another eos (a base model's <|endoftext|> against a chat model's <|im_end|>)
is then refused by `suite check`, as it should be: its chat prompts would end elsewhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from llama_cpp import Llama

from qwen_ref.compare import log_softmax
from qwen_ref.suite_engine import engine_line, tokenizer_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("suite", type=Path, help="the folder `qwen-ref suite make` wrote")
    parser.add_argument("gguf", type=Path, help="the model as a GGUF file")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL to write")
    parser.add_argument("--top-n", type=int, help="tokens listed per position (default: twice the suite's top-K)")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: its own choice)")
    args = parser.parse_args()

    manifest = json.loads((args.suite / "manifest.json").read_text())
    cases = [json.loads(line) for line in (args.suite / "cases.jsonl").read_text().splitlines() if line]
    longest = max(len(case["tokens"]) for case in cases)
    llm = Llama(model_path=str(args.gguf), n_ctx=longest, n_batch=min(longest, 512), logits_all=True,
                n_threads=args.threads, verbose=False)

    stated = {"eos_token_id": llm.token_eos()}
    if manifest["tokenizer"] is not None:
        special = {}
        for text in manifest["tokenizer"]["special_tokens"]:
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            special[text] = ids[0] if len(ids) == 1 else None  # None: not one token here, a mismatch
        stated["special_tokens"] = special
    lines = [tokenizer_line(**stated)]
    for case in cases:
        llm.reset()
        llm.eval(case["tokens"])
        logits = np.array(llm.scores[: llm.n_tokens])  # [T, V] float32
        logprobs = log_softmax(logits)  # [T, V] float64
        lines.append(engine_line(case["id"], case["tokens"], logprobs, args.top_n or 2 * manifest["top_k"]))
    args.out.write_text("".join(lines))


if __name__ == "__main__":
    main()
