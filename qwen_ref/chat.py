"""A conversation that keeps its history and the KV cache of the turns already computed."""

from __future__ import annotations

from collections.abc import Callable

from qwen_ref.chat_template import ChatTemplate
from qwen_ref.generation import GenerationStats, generate
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
    ):
        self.model, self.tokenizer, self.template, self.sampler = model, tokenizer, template, sampler
        self.eos_token_ids, self.max_new_tokens, self.stop_strings = eos_token_ids, max_new_tokens, stop_strings
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
        context_left = self.model.config.max_position_embeddings - len(tokens)
        self.cache.length = common_prefix_length(self.cached_tokens, tokens)

        stats = GenerationStats()
        stream = TextStream(self.tokenizer, self.stop_strings)
        generated = []
        max_new = max(0, min(self.max_new_tokens, context_left))
        for token in generate(self.model, tokens, max_new, self.eos_token_ids, self.sampler, self.cache, stats):
            generated.append(token)
            on_text(stream.push(token))
            if stream.stopped:
                break
        on_text(stream.finish())
        # the cache now holds the prompt and every generated token but the last
        self.cached_tokens = (tokens + generated)[: self.cache.length]
        self.messages = messages + [{"role": "assistant", "content": stream.text}]
        return stream.text, stats
