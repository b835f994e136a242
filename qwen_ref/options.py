"""Command-line options that several commands share, defined once."""

from __future__ import annotations

import argparse

from qwen_ref.backends import BACKEND_NAMES, KERNEL_CHOICES
from qwen_ref.generation import PREFILL_CHUNK
from qwen_ref.kv_cache import DEFAULT_KV_DTYPE, KV_DTYPES

LAYER_MAJOR = ("auto", "on", "off")
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
    """--backend, --kernels, --threads and --layer-major, for every command that runs the model (`cli.main` applies
    --threads)."""
    parser.add_argument("--backend", choices=BACKEND_NAMES, default=DEFAULT_BACKEND, help="(default: %(default)s)")
    parser.add_argument(
        "--kernels", choices=KERNEL_CHOICES, default="auto",
        help="the numba backend's prompt (T >= 4) matrix products: its own tiled kernel, or weights widened to "
             "float32 blocks for NumPy's BLAS; a name also sets the prompt's attention tiles (its micro-kernel or "
             "sgemm); auto takes $QWEN_REF_KERNELS if set, else the faster GEMM on this CPU, measured once and "
             "cached, and sgemm attention tiles where NumPy's OpenBLAS is callable (default: %(default)s)",
    )
    parser.add_argument("--threads", type=positive_int, help="threads for the kernels and BLAS (default: all cores)")
    parser.add_argument(
        "--layer-major", choices=LAYER_MAJOR, default="auto",
        help="run prompts one layer at a time over all chunks, reading each layer's weights once per prompt: "
             "auto chooses it when the weights do not fit in available memory (default: %(default)s)",
    )


def layer_major(args: argparse.Namespace) -> bool | None:
    """--layer-major as load_model takes it: None lets it decide."""
    return {"auto": None, "on": True, "off": False}[args.layer_major]


def add_kv_dtype_option(parser: argparse.ArgumentParser) -> None:
    """--kv-dtype, for the commands that run a checkpoint through a KV cache (`load_model(..., kv_dtype)`)."""
    parser.add_argument("--kv-dtype", choices=tuple(KV_DTYPES), default=DEFAULT_KV_DTYPE,
                        help="what the KV cache stores: bfloat16 or float16 halve its memory and what each decode "
                             "step reads of it, rounding every key and value (README: the logit error) "
                             "(default: %(default)s, as transformers computes)")


def add_prefill_options(parser: argparse.ArgumentParser) -> None:
    """--prefill-chunk and --quiet, for every command that runs a prompt through the model."""
    parser.add_argument("--prefill-chunk", type=positive_int, default=PREFILL_CHUNK, metavar="N",
                        help="prompt tokens per forward pass; attention scratch grows as N x context "
                             "(default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but the answer (no progress bar)")
