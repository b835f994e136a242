"""The eight published Qwen1.5 shapes: their config.json values and their parameter counts.

`qwen-ref info` names the published model a config has the shape of, and tools/make_checkpoint.py
writes random-weight checkpoints of these shapes. The config.json of each is the one on the Hugging
Face Hub (`Qwen/Qwen1.5-<size>`); the source named beside each entry is a public copy of it. The
parameter counts are the Hub's own, which counts the tensors stored in the published safetensors
files, as leaderboards record them when they queue a model (the `params` field of
`Qwen/Qwen1.5-<size>_eval_request_False_bfloat16_Original.json` in the Hub dataset named beside each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen_ref.config import QwenConfig

BOS_EOS_ID = 151643  # <|endoftext|>, bos_token_id and eos_token_id of every published base config


@dataclass(frozen=True)
class PublishedShape:
    """One published size: the config.json fields that differ between sizes, and its published count."""

    name: str  # the Hub repository, without "Qwen/"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_window_layers: int  # unused while use_sliding_window is false, kept as published
    billions: str  # the published parameter count, in billions, with the digits the Hub gives
    rope_theta: float = 1e6
    # The published files hold lm_head.weight although the head is tied (1.24 GB for Qwen1.5-0.5B, not
    # 0.93 GB; github.com/QwenLM/Qwen3 issue 370), so the Hub counts the embedding matrix twice.
    stores_tied_lm_head: bool = False

    def config_json(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The published config.json (transformers 4.37 layout), saved in `torch_dtype`."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": BOS_EOS_ID,
            "eos_token_id": BOS_EOS_ID,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 32768,
            "max_window_layers": self.max_window_layers,
            "model_type": "qwen2",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": 1e-06,
            "rope_theta": self.rope_theta,
            "sliding_window": 32768,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": torch_dtype,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
        }

    def counted_as_published(self, total: int, embedding: int) -> int:
        """A parameter count as the Hub counts this model's files (see `stores_tied_lm_head`)."""
        return total + (embedding if self.stores_tied_lm_head else 0)


# Each entry names its config.json source (a public copy of the Hub file) and the dataset its count is from.
PUBLISHED = {
    # config: kcoopermiller/reyna-qwen-l18 (from Qwen/Qwen1.5-0.5B) and Xenova/Qwen1.5-0.5B-Chat;
    # count: OALL/requests, 0.62
    "0.5b": PublishedShape("Qwen1.5-0.5B", 1024, 2816, 24, 16, 16, 151936, True, 21, "0.62",
                           stores_tied_lm_head=True),
    # config: GreenBitAI/Qwen-1.5-1.8B-channel-mix-bpw-2.5 (from the Qwen/Qwen1.5-1.8B snapshot 7846de7);
    # count: open-llm-leaderboard/requests, 1.837
    "1.8b": PublishedShape("Qwen1.5-1.8B", 2048, 5504, 24, 16, 16, 151936, False, 21, "1.837"),
    # config: GreenBitAI/Qwen-1.5-4B-layer-mix-bpw-2.2 (from the Qwen/Qwen1.5-4B snapshot a66363a);
    # count: open-llm-leaderboard/requests, 3.95
    "4b": PublishedShape("Qwen1.5-4B", 2560, 6912, 40, 20, 20, 151936, False, 21, "3.95", rope_theta=5e6),
    # config: huggingface/transformers examples/pytorch/torchacc/qwen/Qwen1.5-7B/config.json (a copy of
    # Qwen/Qwen1.5-7B's) and Qwen/Qwen1.5-7B-Chat at c893e33; count: open-llm-leaderboard/requests, 7.721
    "7b": PublishedShape("Qwen1.5-7B", 4096, 11008, 32, 32, 32, 151936, False, 28, "7.721"),
    # config: M4-ai/Hercules-Qwen1.5-14B (from Qwen/Qwen1.5-14B); count: open-llm-leaderboard/requests, 14.167
    "14b": PublishedShape("Qwen1.5-14B", 5120, 13696, 40, 40, 40, 152064, False, 35, "14.167"),
    # config: GreenBitAI/Qwen-1.5-32B-layer-mix-bpw-2.5 (from the Qwen/Qwen1.5-32B snapshot cefef80);
    # count: OALL/requests, 32.512
    "32b": PublishedShape("Qwen1.5-32B", 5120, 27392, 64, 40, 8, 152064, False, 35, "32.512"),
    # config: Qwen/Qwen1.5-72B-Chat at 3eebb4d (its Hub page); count: open-cn-llm-leaderboard/requests, 72.288
    "72b": PublishedShape("Qwen1.5-72B", 8192, 24576, 80, 64, 64, 152064, False, 70, "72.288"),
    # config: second-state/Qwen1.5-110B-Chat-GGUF (a copy of Qwen/Qwen1.5-110B-Chat's config.json);
    # count: open-llm-leaderboard/requests, 111.21
    "110b": PublishedShape("Qwen1.5-110B", 8192, 49152, 80, 64, 8, 152064, False, 70, "111.21"),
}


def published_shape(config: QwenConfig) -> PublishedShape | None:
    """The published size whose layers and vocabulary `config` has (any number of its layers), if any."""
    for shape in PUBLISHED.values():
        if (
            (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
             config.vocab_size, config.tie_word_embeddings, config.head_dim)
            == (shape.hidden_size, shape.intermediate_size, shape.num_attention_heads, shape.num_key_value_heads,
                shape.vocab_size, shape.tie_word_embeddings, shape.hidden_size // shape.num_attention_heads)
            and config.num_hidden_layers <= shape.num_hidden_layers
        ):
            return shape
    return None
