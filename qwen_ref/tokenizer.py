"""Text <-> token ids, with the checkpoint's own tokenizer.json (byte-level BPE for Qwen)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from qwen_ref.errors import QwenRefError


class Tokenizer:
    """The `tokenizers` library's Tokenizer with the checkpoint's special tokens (<|im_start|>...)."""

    def __init__(self, path: Path):
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises a bare Exception for a corrupt file
            raise QwenRefError(f"{path}: cannot load tokenizer ({exc})") from None

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> Tokenizer | None:
        """The tokenizer of a checkpoint folder, or None when it ships no tokenizer.json."""
        path = Path(model_dir) / "tokenizer.json"
        return cls(path) if path.is_file() else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings such as <|im_end|> become their ids.

        Qwen adds no BOS token, so this equals transformers' `tokenizer(text).input_ids`.
        """
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (a special token such as <|im_end|>), or None when it is not one."""
        return self._tok.token_to_id(token)

    def special_tokens(self) -> dict[str, int]:
        """The added tokens marked special (<|endoftext|>, <|im_start|>, ...), by text, in id order."""
        added = sorted(self._tok.get_added_tokens_decoder().items())
        return {token.content: token_id for token_id, token in added if token.special}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; special tokens (eos, <|im_end|>) are dropped unless asked for."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class TextStream:
    """Generated ids in, printable text out, piece by piece, as tokens arrive.

    Byte-level BPE can split one character (a CJK ideograph, an emoji) over several tokens; until
    the last byte arrives the decoded text ends in U+FFFD, so that tail is held back. Text that could
    be the start of a stop string is held back too; once a stop string appears, everything from it
    on is dropped and `stopped` is set. The pieces joined equal `text` at every moment.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.text = ""  # what has been handed out so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated token; return the text that is now safe to print (maybe '')."""
        self.ids.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        """The held-back rest, once generation has ended."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.stopped:
            return ""
        decoded = self.tokenizer.decode(self.ids)
        for stop in self.stop_strings:
            # a stop string can only start where the previous check could not yet see it whole
            at = decoded.find(stop, max(0, len(self.text) - len(stop) + 1))
            if at >= 0:
                self.stopped = True
                decoded = decoded[:at]
        end = len(decoded)
        if not final and not self.stopped:
            if decoded.endswith("\ufffd"):  # an unfinished UTF-8 sequence
                end = len(decoded.rstrip("\ufffd"))
            end -= self._partial_stop_length(decoded[:end])
        piece = decoded[len(self.text) : max(end, len(self.text))]
        self.text += piece
        return piece

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
