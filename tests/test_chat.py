"""ChatSession: a conversation's KV cache grows with it and keeps the turns already computed."""

import numpy as np

from qwen_ref.chat import ChatSession
from qwen_ref.chat_template import ChatTemplate
from qwen_ref.config import load_generation_config
from qwen_ref.model import load_model
from qwen_ref.sampling import GREEDY, Sampler
from qwen_ref.tokenizer import Tokenizer


def test_cache_is_sized_to_the_conversation_and_a_larger_one_keeps_the_earlier_turns(text_model):
    model, tokenizer = load_model(text_model), Tokenizer.from_model_dir(text_model)
    eos = load_generation_config(text_model, model.config).eos_token_ids
    session = ChatSession(model, tokenizer, ChatTemplate.from_model_dir(text_model), Sampler(GREEDY), eos,
                          max_new_tokens=8)
    session.reply("Hello there", lambda piece: None)
    first = session.cache
    first_turn = len(session.cached_tokens)
    assert first_turn <= first.capacity <= first_turn + 9  # the prompt and 8 new tokens, not the 32K context
    kept = first.keys[:, :, :first_turn].copy(), first.values[:, :, :first_turn].copy()  # [L, Hkv, n, hd] each

    session.reply("And now a second, longer question about the weather in Paris in the spring", lambda piece: None)
    assert session.cache is not first and session.cache.capacity >= 2 * first.capacity
    # the system prompt and the first user turn come first in both renderings: their keys were carried over
    shared = len(tokenizer.encode(ChatTemplate.from_model_dir(text_model).render(
        [{"role": "user", "content": "Hello there"}])))
    assert np.array_equal(session.cache.keys[:, :, :shared], kept[0][:, :, :shared])
    assert np.array_equal(session.cache.values[:, :, :shared], kept[1][:, :, :shared])
