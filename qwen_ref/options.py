"""Command-line options that several commands share, defined once."""

from __future__ import annotations

import argparse

from qwen_ref.backends import BACKEND_NAMES
from qwen_ref.generation import PREFILL_CHUNK

DEFAULT_BACKEND = "numba"  # the readable numpy path is the specification; numba runs it fast


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"wants a positive integer, got {text!r}")
    return value


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--backend and --threads, for every command that runs the model (`cli.main` applies --threads)."""
    parser.add_argument("--backend", choices=BACKEND_NAMES, default=DEFAULT_BACKEND, help="(default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, help="threads for the kernels and BLAS (default: all cores)")


def add_prefill_options(parser: argparse.ArgumentParser) -> None:
    """--prefill-chunk and --quiet, for every command that runs a prompt through the model."""
    parser.add_argument("--prefill-chunk", type=positive_int, default=PREFILL_CHUNK, metavar="N",
                        help="prompt tokens per forward pass; attention scratch grows as N x context "
                             "(default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but the answer (no progress bar)")
