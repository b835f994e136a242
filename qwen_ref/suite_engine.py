"""Another engine's outputs for a suite: JSONL of log-probabilities, read, checked against the manifest, written.

The format asks nothing of an engine but JSON. One line per case, any order:

    {"id": "greeting", "tokens": [151644, 8948, ...],
     "top_logprobs": [{"151645": -0.031, "198": -3.52, ...}, ...]}

`tokens` are the case's token ids (the suite's cases.jsonl lists them: run those, do not tokenize
again). `top_logprobs[t]` is the engine's distribution of the token after tokens[t], teacher-forced
on tokens[:t+1]: its N most likely token ids (as strings, JSON keys being strings) with natural-log
probabilities (log_softmax of the logits, no temperature), N >= the suite's K (2K makes tokens of
the reference's top-K that fall outside the engine's list rare; suite_judge says how they are
bounded). It has T entries, or T - 1 when the engine gives none after the last token (as prompt
logprob APIs do).

An optional first line states the engine's tokenizer; every field given must equal the reference's:

    {"tokenizer": {"sha256": ..., "special_tokens": {"<|im_end|>": 151645, ...},
                   "eos_token_id": 151645, "bos_token_id": null, "pad_token_id": 151643,
                   "chat_template_sha256": ...}}

`sha256` is `qwen_ref.fingerprint.tokenizer_hash` of the folder holding tokenizer.json; an engine
with its own copy of the vocabulary (a GGUF file) states the special tokens instead. The token ids
of every case are compared whatever the header says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_ref.errors import QwenRefError
from qwen_ref.prompt import read_jsonl_objects
from qwen_ref.suite_reference import top_ids

TOKENIZER_FIELDS = ("sha256", "special_tokens", "eos_token_id", "bos_token_id", "pad_token_id", "chat_template_sha256")


@dataclass(frozen=True)
class EngineCase:
    id: str
    tokens: tuple[int, ...]  # [T]
    top: list[tuple[np.ndarray, np.ndarray]]  # P <= T positions of (ids int64 [N], logprobs float64 [N])


def read_engine_outputs(path: Path, vocab_size: int) -> tuple[dict | None, dict[str, EngineCase]]:
    """(the stated tokenizer or None, cases by id) of an engine's JSONL file; one-line errors name the line."""
    header: dict | None = None
    cases: dict[str, EngineCase] = {}
    for _, where, item in read_jsonl_objects(path):
        if "tokenizer" in item:
            if cases or header is not None or set(item) != {"tokenizer"} or not isinstance(item["tokenizer"], dict):
                raise QwenRefError(f"{where}: the tokenizer line must come first, alone: {{\"tokenizer\": {{...}}}}")
            header = item["tokenizer"]
            unknown = sorted(set(header) - set(TOKENIZER_FIELDS))
            if unknown:
                raise QwenRefError(f"{where}: unknown tokenizer field {unknown[0]!r} "
                                   f"(known: {', '.join(TOKENIZER_FIELDS)})")
            continue
        case = _engine_case(item, where, vocab_size)
        if case.id in cases:
            raise QwenRefError(f"{where}: case {case.id!r} appears twice")
        cases[case.id] = case
    return header, cases


def _engine_case(item: dict, where: str, vocab_size: int) -> EngineCase:
    if set(item) != {"id", "tokens", "top_logprobs"}:
        raise QwenRefError(f"{where}: a case line has exactly 'id', 'tokens' and 'top_logprobs', "
                           f"not {', '.join(sorted(item))}")
    case_id, tokens, positions = item["id"], item["tokens"], item["top_logprobs"]
    if not isinstance(case_id, str):
        raise QwenRefError(f"{where}: 'id' must be a string")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise QwenRefError(f"{where}: 'tokens' must be a list of integers")
    if not isinstance(positions, list) or not all(isinstance(p, dict) and p for p in positions):
        raise QwenRefError(f"{where}: 'top_logprobs' must be a list of non-empty {{token id: logprob}} objects")
    top = []
    for t, entry in enumerate(positions):
        try:
            ids = np.array([int(k) for k in entry], dtype=np.int64)  # [N]
            logprobs = np.array([float(v) for v in entry.values()])  # [N]
        except (TypeError, ValueError):
            raise QwenRefError(f"{where}: position {t}: want {{\"token id\": logprob}} with numeric values") from None
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise QwenRefError(f"{where}: position {t}: a token id is outside the vocabulary [0, {vocab_size})")
        if np.isnan(logprobs).any() or (logprobs > 1e-6).any():  # float rounding may put a certain token at +0
            raise QwenRefError(f"{where}: position {t}: log-probabilities must be <= 0 and not NaN")
        top.append((ids, logprobs))
    return EngineCase(case_id, tuple(tokens), top)


def check_tokenizer(stated: dict | None, reference: dict | None) -> None:
    """Refuse an engine whose stated tokenizer differs from the reference's in any field it states."""
    if stated is None:
        return
    if reference is None:
        raise QwenRefError("the engine states a tokenizer but the reference has none (a token-ids-only suite): "
                           "drop the tokenizer line")
    for field, value in stated.items():
        want = reference.get(field)
        if field == "special_tokens":
            if not isinstance(value, dict):
                raise QwenRefError("tokenizer mismatch: 'special_tokens' must map token text to id")
            for text, token_id in value.items():
                if want.get(text) != token_id:
                    raise QwenRefError(f"tokenizer mismatch: the engine's special token {text!r} is {token_id}, "
                                       f"the reference's is {want.get(text)}")
        elif value != want:
            raise QwenRefError(f"tokenizer mismatch: the engine's {field} is {json.dumps(value)}, "
                               f"the reference's is {json.dumps(want)}")


def check_same_cases(reference_cases: list[tuple[str, tuple[int, ...]]], engine: dict[str, EngineCase],
                     top_k: int) -> None:
    """Refuse outputs that lack a case, hold an unknown one, ran other token ids, or list fewer than K tokens."""
    ref_ids = [case_id for case_id, _ in reference_cases]
    missing = [c for c in ref_ids if c not in engine]
    unknown = sorted(set(engine) - set(ref_ids))
    if missing:
        raise QwenRefError(f"the engine's outputs lack {len(missing)} case(s), first {missing[0]!r}")
    if unknown:
        raise QwenRefError(f"the engine's outputs hold case {unknown[0]!r}, which the reference does not")
    for case_id, tokens in reference_cases:
        other = engine[case_id]
        if other.tokens != tokens:
            if len(other.tokens) != len(tokens):
                detail = f"{len(other.tokens)} tokens, the reference {len(tokens)}"
            else:
                t = next(i for i, (a, b) in enumerate(zip(other.tokens, tokens)) if a != b)
                detail = f"token {t} is {other.tokens[t]}, the reference's {tokens[t]}"
            raise QwenRefError(f"tokenizer mismatch: case {case_id!r}: {detail} "
                               "(run the token ids of the suite's cases.jsonl)")
        if len(other.top) not in (len(tokens) - 1, len(tokens)) or not other.top:
            raise QwenRefError(f"case {case_id!r}: {len(other.top)} positions of logprobs for {len(tokens)} tokens "
                               f"(want {len(tokens)}, or {len(tokens) - 1} without the last)")
        short = next((t for t, (ids, _) in enumerate(other.top) if len(ids) < top_k), None)
        if short is not None:
            raise QwenRefError(f"case {case_id!r}: position {short} lists {len(other.top[short][0])} tokens, "
                               f"fewer than the suite's top-K of {top_k}")


def engine_line(case_id: str, tokens: list[int], logprobs: np.ndarray, top_n: int) -> str:
    """One case line from full log-probabilities [P, V] (what a recipe in tools/ writes)."""
    positions = []
    for row in np.asarray(logprobs, dtype=np.float64):  # [V]
        ids = top_ids(row, min(top_n, len(row)))  # [N], in the reference's order (ties: lower id)
        positions.append({str(int(i)): float(row[i]) for i in ids})
    return json.dumps({"id": case_id, "tokens": [int(t) for t in tokens], "top_logprobs": positions}) + "\n"


def tokenizer_line(**fields) -> str:
    """The optional first line, stating the engine's tokenizer."""
    unknown = sorted(set(fields) - set(TOKENIZER_FIELDS))
    if unknown:
        raise ValueError(f"unknown tokenizer field {unknown[0]!r}")
    return json.dumps({"tokenizer": fields}) + "\n"
