"""qwen-ref as an lm-evaluation-harness model, registered as "qwen-ref" (the optional `eval` extra).

lm-eval (0.4.13, as the extra requires) looks models up in its own registry, which holds its built-in
models and whatever registered itself on import; it reads no entry points for models, and
--include_path adds tasks only. So this module registers the model, then hands its command line
to lm-eval's:

    python -m qwen_ref.lm_eval_model --model qwen-ref --model_args model=DIR --tasks TASK

From Python: `import qwen_ref.lm_eval_model`, then `lm_eval.simple_evaluate(model="qwen-ref", ...)`.
model_args: model (the checkpoint folder), backend, kv_dtype, threads, max_length (default: the
model's context), max_gen_toks (256), prefill_chunk, seed (of sampled generation). lm-eval's
batch_size and device are accepted and ignored (its --device defaults to cuda:0): qwen-ref runs on
the CPU, requests one at a time, sharing what they can instead of batching.

What is shared: requests are sorted by their context tokens, so equal contexts (a multiple-choice
question's choices) and shared prefixes (few-shot examples) come together, and one `PrefixCache`
computes each prefix once (`qwen_ref.score`). The results go back in lm-eval's order.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from qwen_ref.backends import get_backend
from qwen_ref.chat_template import ChatTemplate
from qwen_ref.config import load_generation_config
from qwen_ref.errors import QwenRefError
from qwen_ref.generation import PREFILL_CHUNK, generate
from qwen_ref.kv_cache import DEFAULT_KV_DTYPE
from qwen_ref.model import load_model
from qwen_ref.options import DEFAULT_BACKEND
from qwen_ref.sampling import Sampler, SamplingParams
from qwen_ref.score import PrefixCache, positions_read, score_continuations
from qwen_ref.threads import set_threads
from qwen_ref.tokenizer import TextStream, Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default (HFLM)
_SAMPLING_KWARGS = ("top_k", "top_p", "min_p", "repetition_penalty")


def end_of_text_id(model_dir: Path, tokenizer: Tokenizer, eos_ids: Sequence[int]) -> int:
    """The token lm-eval puts before an empty context and a rolling window: HFLM takes the tokenizer's
    eos_token (tokenizer_config.json; <|endoftext|> in base Qwen1.5, <|im_end|> in chat), else the first eos id."""
    path = model_dir / "tokenizer_config.json"
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token") if path.is_file() else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    ids = tokenizer.encode(eos) if isinstance(eos, str) else []
    if len(ids) == 1:
        return ids[0]
    if not eos_ids:
        raise QwenRefError(f"{model_dir}: no eos token in tokenizer_config.json or generation_config.json")
    return eos_ids[0]


def _sorted_by_tokens(token_lists: Sequence[Sequence[int]]) -> list[int]:
    """Indices in the lexicographic order of the token lists: shared prefixes become neighbours."""
    return sorted(range(len(token_lists)), key=lambda i: list(token_lists[i]))


@register_model("qwen-ref")
class QwenRefLM(TemplateLM):
    """loglikelihood, loglikelihood_rolling and generate_until on qwen-ref's forward pass and KV cache."""

    def __init__(self, model: str, backend: str = DEFAULT_BACKEND, kv_dtype: str = DEFAULT_KV_DTYPE,
                 threads: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, prefill_chunk: int = PREFILL_CHUNK, seed: int = 1234,
                 batch_size: int | str | None = None, max_batch_size: int | None = None, device: str | None = None):
        super().__init__()
        if threads is not None:
            set_threads(int(threads))
        self.model_dir = Path(model)
        self.model = load_model(self.model_dir, get_backend(backend), kv_dtype=kv_dtype)
        tokenizer = Tokenizer.from_model_dir(self.model_dir)
        if tokenizer is None:
            raise QwenRefError(f"{self.model_dir}: no tokenizer.json, which lm-eval's text requests need")
        self.qwen_tokenizer = tokenizer  # not `tokenizer`: lm-eval takes that for a transformers tokenizer
        generation = load_generation_config(self.model_dir, self.model.config)
        self.eos_ids = generation.eos_token_ids
        self.sampling = SamplingParams.from_generation_config(generation)  # as `qwen-ref generate` decodes
        self._eot = end_of_text_id(self.model_dir, tokenizer, self.eos_ids)
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.prefill_chunk = int(prefill_chunk)
        self.seed = int(seed)

    # --- what TemplateLM asks of a model ------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.model_dir)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.qwen_tokenizer.encode(string)  # Qwen adds no BOS either way

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.qwen_tokenizer.decode(list(tokens))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return ChatTemplate.from_model_dir(self.model_dir).render(chat_history, add_generation_prompt)

    # --- requests ------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p, greedy) per ((context, continuation), context ids, continuation ids).

        A context too long for max_length loses its oldest tokens, as HFLM truncates from the left.
        """
        contexts, continuations = [], []
        for _, context, continuation in requests:
            if not 1 <= len(continuation) <= self.max_length:
                raise QwenRefError(f"a continuation of {len(continuation)} tokens cannot be scored within "
                                   f"max_length {self.max_length}")
            keep = self.max_length + 1 - len(continuation)  # >= 1: the model reads keep + len - 1 tokens
            contexts.append(tuple(context[-keep:]))
            continuations.append(list(continuation))
        if not requests:
            return []
        capacity = max(positions_read(c, x) for c, x in zip(contexts, continuations))
        prefix = PrefixCache(self.model, capacity, self.prefill_chunk)
        groups: dict[tuple[int, ...], list[int]] = {}  # each distinct context's requests, in lm-eval's order
        for i, context in enumerate(contexts):
            groups.setdefault(context, []).append(i)
        ordered = [list(groups)[i] for i in _sorted_by_tokens(list(groups))]
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for context in tqdm(ordered, desc="qwen-ref loglikelihood", unit="context", file=sys.stderr,
                            disable=disable_tqdm):
            members = groups[context]
            scored = score_continuations(prefix, context, [continuations[i] for i in members])
            for i, s in zip(members, scored):
                results[i] = (s.total, s.greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole texts in lm-eval's rolling windows: the first token after the end-of-text token,
        each window max_length tokens, every token scored once (`lm_eval.utils.get_rolling_token_windows`)."""
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="qwen-ref rolling", file=sys.stderr,
                            disable=disable_tqdm):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            scored = self._loglikelihood_tokens([(None, c, x) for c, x in windows], disable_tqdm=True)
            out.append(sum(total for total, _ in scored))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    def _sampling_params(self, kwargs: dict) -> SamplingParams:
        """The checkpoint's decoding settings (as `qwen-ref generate`), greedy unless the request samples."""
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
        params = replace(self.sampling, temperature=temperature,
                         **{k: kwargs.pop(k) for k in _SAMPLING_KWARGS if k in kwargs})
        if kwargs:
            log.warning("qwen-ref ignores the generation settings %s", sorted(kwargs))
        return params

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The text generated after each context, up to the first `until` string (dropped) or an eos token."""
        eot_text = self.qwen_tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        jobs = []
        for context, gen_kwargs in [r.args for r in requests]:
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eot_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise QwenRefError(f"max_gen_toks {max_new} leaves no room for a context in max_length "
                                   f"{self.max_length}")
            tokens = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            jobs.append((tokens, until, max_new, self._sampling_params(kwargs), (context, gen_kwargs)))
        if not jobs:
            return []
        prefix = PrefixCache(self.model, max(len(t) + n for t, _, n, _, _ in jobs), self.prefill_chunk)
        out = [""] * len(jobs)
        for i in tqdm(_sorted_by_tokens([job[0] for job in jobs]), desc="qwen-ref generate_until",
                      file=sys.stderr, disable=disable_tqdm):
            tokens, until, max_new, params, request = jobs[i]
            prefix.hold(tokens[:-1])  # what earlier contexts share with this one is not computed again
            stream = TextStream(self.qwen_tokenizer, tuple(until))
            for token in generate(self.model, tokens, max_new, self.eos_ids, Sampler(params, self.seed),
                                  cache=prefix.cache, prefill_chunk=self.prefill_chunk):
                stream.push(token)
                if stream.stopped:
                    break
            stream.finish()
            prefix.cache.truncate(len(tokens) - 1)
            out[i] = stream.text
            self.cache_hook.add_partial("generate_until", request, out[i])
        return out


def main() -> None:
    """lm-eval's own command line, with "qwen-ref" registered."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except QwenRefError as exc:
        sys.exit(f"qwen-ref: error: {exc}")


if __name__ == "__main__":
    main()
