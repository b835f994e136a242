"""A conversation that keeps its history and the KV cache of the turns already computed."""

from __future__ import annotations

from collections.abc import Callable

from qwen_ref.chat_template import ChatTemplate
from qwen_ref.errors import QwenRefError
from qwen_ref.generation import PREFILL_CHUNK, GenerationStats, generate
from qwen_ref.model import QwenModel
from qwen_ref.sampling import Sampler
from qwen_ref.tokenizer import TextStream, Tokenizer


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """Each reply renders the whole conversation with the chat template, as transformers would,
    but only the tokens after the longest prefix already in the KV cache are computed again."""

    def __init__(
        self,
        model: QwenModel,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        sampler: Sampler,
        eos_token_ids: tuple[int, ...],
        max_new_tokens: int,
        system: str | None = None,
        stop_strings: tuple[str, ...] = (),
        prefill_chunk: int = PREFILL_CHUNK,
        progress: Callable[[int], Callable[[int], object]] | None = None,
    ):
        """`progress(n)`, called before a turn's n new prompt tokens go through the model, returns the
        callback that follows its chunks (a progress bar)."""
        self.model, self.tokenizer, self.template, self.sampler = model, tokenizer, template, sampler
        self.eos_token_ids, self.max_new_tokens, self.stop_strings = eos_token_ids, max_new_tokens, stop_strings
        self.prefill_chunk, self.progress = prefill_chunk, progress
        self.cache = model.new_cache()  # the whole context; memory is committed only as it fills
        self.cached_tokens: list[int] = []  # the tokens whose keys and values are in the cache
        self.system = system
        self.messages: list[dict[str, str]] = []

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (and optionally set a new system prompt)."""
        self.system = system if system is not None else self.system
        self.messages = []

    def reply(self, user_text: str, on_text: Callable[[str], object]) -> tuple[str, GenerationStats]:
        """Answer one user message; `on_text` receives the reply as it streams."""
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        messages = self.messages + [{"role": "user", "content": user_text}]
        tokens = self.tokenizer.encode(self.template.render(system + messages))
        context = self.model.config.max_position_embeddings
        if len(tokens) >= context:
            raise QwenRefError(f"the conversation is {len(tokens)} tokens, which leaves no room for a reply in the "
                               f"model's context of {context} tokens (/reset starts over)")
        max_new = min(self.max_new_tokens, context - len(tokens))
        # at least the last prompt token is computed again: its logits give the first new token
        reused = min(common_prefix_length(self.cached_tokens, tokens), len(tokens) - 1)
        self.cache.length = reused

        stats = GenerationStats()
        stream = TextStream(self.tokenizer, self.stop_strings)
        generated = []
        on_chunk = None if self.progress is None else self.progress(len(tokens) - reused)
        for token in generate(self.model, tokens, max_new, self.eos_token_ids, self.sampler, self.cache, stats,
                              self.prefill_chunk, on_chunk):
            generated.append(token)
            on_text(stream.push(token))
            if stream.stopped:
                break
        on_text(stream.finish())
        # the cache now holds the prompt and every generated token but the last
        self.cached_tokens = (tokens + generated)[: self.cache.length]
        self.messages = messages + [{"role": "assistant", "content": stream.text}]
        return stream.text, stats
