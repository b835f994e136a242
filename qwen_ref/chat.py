"""A conversation that keeps its history and the KV cache of the turns already computed."""

from __future__ import annotations

from collections.abc import Callable

from qwen_ref.chat_template import ChatTemplate
from qwen_ref.errors import QwenRefError
from qwen_ref.generation import PREFILL_CHUNK, GenerationStats, generate
from qwen_ref.kv_cache import KVCache
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
    but only the tokens after the longest prefix already in the KV cache are computed again.

    The cache grows with the conversation (doubling, up to the model's context) rather than being
    made for the whole context at once: NumPy backs large arrays with 2 MB pages where the kernel
    allows, so a whole-context cache committed one such page per layer, kv head and K or V at the
    first token (1.5 GB of Qwen1.5-0.5B's 6 GB for 32K tokens).
    """

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
        self.cache = model.new_cache(0)  # grown by each turn to what it needs
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
        self.cache = self._cache_with_room(len(tokens) + max_new, reused)

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

    def _cache_with_room(self, n_tokens: int, reused: int) -> KVCache:
        """A cache for n_tokens whose first `reused` positions hold this session's: the current one if it is
        large enough, else a copy into one twice as large (at most the model's context)."""
        if n_tokens <= self.cache.capacity:
            self.cache.length = reused
            return self.cache
        context = self.model.config.max_position_embeddings
        grown = self.model.new_cache(min(context, max(n_tokens, 2 * self.cache.capacity)))
        grown.keys[:, :, :reused] = self.cache.keys[:, :, :reused]  # [L, Hkv, reused, hd]
        grown.values[:, :, :reused] = self.cache.values[:, :, :reused]
        grown.length = reused
        return grown
