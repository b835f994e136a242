"""The prefill progress bar: on stderr, only for prompts of several chunks, hidden by --quiet."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm import tqdm


def prefill_bar(n_tokens: int, chunk: int, quiet: bool) -> Callable[[int], None]:
    """A bar for a prefill of `n_tokens`, `chunk` tokens per forward pass; call the result with the tokens
    each chunk did. The bar clears itself once all are done, before any answer is printed."""
    bar = tqdm(total=n_tokens, desc="prefill", unit="tok", file=sys.stderr, leave=False,
               disable=quiet or n_tokens <= chunk)

    def advance(done: int) -> None:
        bar.update(done)
        if bar.n >= n_tokens:
            bar.close()

    return advance
