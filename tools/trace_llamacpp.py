r"""llama.cpp's llama-eval-callback output read as a qwen-ref trace: the printed values in place, NaN elsewhere.

    python tools/trace_llamacpp.py eval.txt --out llamacpp.safetensors [--verbose]   (or - for stdin)

What llama-eval-callback prints (common/debug.cpp, common_debug_cb_eval): for every node of the graph
as it is computed, one header line

    common_debug_cb_eval:  Qcur-0 = (f32)  ROPE(Qcur-0{16, 4, 5, 1}, inp_pos{5, 1, 1, 1}}) = {16, 4, 5, 1}

(name, type, op, each source's name and ne, the result's ne: ggml's axes, ne0 the fastest), then the
values with "%12.4f", nested as ne3 > ne2 > ne1 > ne0, where along ne0, ne1 and ne2 only the first 3 and
the last 3 are printed when there are more than 6 (all of ne3), then `sum = ` the float sum of every
element. Before the graph it prints the prompt's token ids ("number of input tokens = N", one id a line).

Mapping (the qwen2 graph, src/models/qwen2.cpp, and llm_graph_context's build_qkv/build_attn/build_ffn;
llama.cpp names a layer's tensor NAME-N and reuses a name for several ops, told apart by the op):
    embd GET_ROWS -> inp_embd (older llama.cpp: inp_embd)   attn_norm-N MUL -> attn_norm
    Qcur-N ADD (q_proj + bias) and RESHAPE -> Qcur            Qcur-N ROPE -> Qcur_rope   (Kcur, Vcur alike)
    kqv_out-N CONT -> kqv_out                                 MUL_MAT(blk.N.attn_output.weight, ...) -> attn_out
    ffn_inp-N ADD, ffn_norm-N MUL, ffn_gate-N MUL_MAT, ffn_up-N MUL_MAT -> the same names
    ffn_swiglu-N SWIGLU -> ffn_act   ffn_out-N MUL_MAT -> ffn_out   l_out-N ADD -> l_out
    result_norm MUL, result_output MUL_MAT -> the same names
Everything else (norm-N before the weight, the q/k/v MUL_MAT before the bias, kq, the softmax, the KV
cache views and copies, the last layer's row selection) has no trace name and is skipped (--verbose
lists it). Sources of one trace name printed twice (Qcur's ADD and RESHAPE) are merged; where both
printed an entry they must agree. ggml's ne reversed is the trace's shape: {hd, H, T} -> [T, H, hd].

The last layer: llama.cpp keeps only the output positions after the attention (`inp_out_ids`), and
eval-callback asks for the last one, so its ffn_inp .. l_out, result_norm and result_output hold the
last position alone; the trace has all T rows and NaN in the others. The trace's metadata say
`"missing_values": "nan"` (NaN marks an entry llama.cpp did not print), `"value_decimals": "4"`, the
tokens, and in `sums` every mapped tensor's printed sum with the rows it covers ({key: [start, stop, sum]}).

Recipe: llama.cpp against qwen-ref, tensor by tensor
  1. Build llama-eval-callback from the llama-cpp-python sdist (llama.cpp is not a dependency of qwen-ref):
         pip download llama-cpp-python --no-deps --no-binary :all: -d /tmp/lcpp
         cd /tmp/lcpp && tar xzf llama_cpp_python-*.tar.gz
         cd llama_cpp_python-*/vendor/llama.cpp
         cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
         cmake --build build --target llama-eval-callback -j2
  2. Convert the checkpoint to GGUF float32 (the converter needs gguf-py on PYTHONPATH, torch, transformers
     and sentencepiece, e.g. `pip install --target /tmp/lcpp/pydeps sentencepiece`):
         PYTHONPATH=gguf-py:/tmp/lcpp/pydeps python convert_hf_to_gguf.py MODEL_DIR --outtype f32 \
             --outfile model-f32.gguf
  3. Run one prompt: one thread, float32 KV cache, no flash attention (it would round K and V to float16),
     batches that hold the whole prompt (the defaults: -b 2048, -ub 512 tokens), output and log in one file:
         build/bin/llama-eval-callback -m model-f32.gguf -p "Hello world, this is" -t 1 -tb 1 \
             -ctk f32 -ctv f32 -fa off -c 64 > eval.txt 2>&1
  4. Parse it:       python tools/trace_llamacpp.py eval.txt --out llamacpp.safetensors
  5. qwen-ref's trace of the same tokens (they are in the output and in the trace's `tokens`), then compare:
         qwen-ref trace --model MODEL_DIR --tokens 9707,1879,11,419,374 --out qwen-ref.safetensors
         qwen-ref compare qwen-ref.safetensors llamacpp.safetensors
     llama.cpp prints 4 decimals, so agreeing entries differ by up to 5e-5 plus float error. That rounding
     alone is an NMSE of about 1e-8 / (12 var(A)): 5.9e-8 on the sample's embedding (values of std 0.125),
     above compare's float32 default; the metadata's `value_decimals` (4) tells compare to allow for it
     tensor by tensor (qwen_ref/trace_diff.py).
tests/data/llamacpp/ holds a real sample made this way (tools/make_llamacpp_sample.sh regenerates it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this tree's qwen_ref, whatever is installed

from qwen_ref.trace import Trace, forward_order, save_trace, trace_key

PRINTED_PER_END = 3  # common_debug_print_tensor's n: the first and last 3 along ne0, ne1, ne2
SOURCE = "llama.cpp eval-callback"

_HEADER = re.compile(
    r"^\w+:\s+(?P<name>.+?) = \((?P<type>\w+)\)\s+(?P<op>\S+)\((?P<src0>.*?)\{(?P<src0_ne>[\d, ]+)\}, "
    r"(?:(?P<src1>.*?)\{(?P<src1_ne>[\d, ]+)\})?\}\) = \{(?P<ne>[\d, ]+)\}\s*$"
)
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|nan|inf)", re.IGNORECASE)
_SUM = re.compile(r"^\s*sum = (\S+)\s*$")
_N_TOKENS = re.compile(r"number of input tokens = (\d+)")
_TOKEN_LINE = re.compile(r"^(?:[\d.]+ I)?\s+(\d+)\s*$")  # "0.01.456.247 I   9707" (log prefix optional)
_LAYER_NAME = re.compile(r"(?P<base>\w+)-(?P<layer>\d+)")
_ATTN_OUTPUT = re.compile(r"blk\.(\d+)\.attn_output\.weight")

# (llama.cpp name without "-N", op) -> (trace name, the ne axis of the positions)
MAPPING = {
    ("embd", "GET_ROWS"): ("inp_embd", 1), ("inp_embd", "GET_ROWS"): ("inp_embd", 1),
    ("attn_norm", "MUL"): ("attn_norm", 1),
    ("Qcur", "ADD"): ("Qcur", 1), ("Qcur", "RESHAPE"): ("Qcur", 2), ("Qcur", "ROPE"): ("Qcur_rope", 2),
    ("Kcur", "ADD"): ("Kcur", 1), ("Kcur", "RESHAPE"): ("Kcur", 2), ("Kcur", "ROPE"): ("Kcur_rope", 2),
    ("Vcur", "ADD"): ("Vcur", 1), ("Vcur", "RESHAPE"): ("Vcur", 2),
    ("kqv_out", "CONT"): ("kqv_out", 1),
    ("ffn_inp", "ADD"): ("ffn_inp", 1),
    ("ffn_norm", "MUL"): ("ffn_norm", 1),
    ("ffn_gate", "MUL_MAT"): ("ffn_gate", 1), ("ffn_up", "MUL_MAT"): ("ffn_up", 1),
    ("ffn_swiglu", "SWIGLU"): ("ffn_act", 1),
    ("ffn_out", "MUL_MAT"): ("ffn_out", 1),
    ("l_out", "ADD"): ("l_out", 1),
    ("result_norm", "MUL"): ("result_norm", 1), ("result_output", "MUL_MAT"): ("result_output", 1),
}


class ParseError(ValueError):
    pass


@dataclass
class Printed:
    """One node as eval-callback printed it."""

    name: str
    op: str
    src0: str
    ne: tuple[int, int, int, int]
    values: np.ndarray  # [ne3, ne2, ne1, ne0] float32, NaN where not printed
    total: float  # the printed sum of every element


def printed_indices(n: int) -> list[int]:
    """The indices eval-callback prints along an axis of n (ne0, ne1 or ne2)."""
    if n <= 2 * PRINTED_PER_END:
        return list(range(n))
    return [*range(PRINTED_PER_END), *range(n - PRINTED_PER_END, n)]


def parse_output(lines: list[str]) -> tuple[list[int] | None, list[Printed]]:
    """The token ids (None if not shown) and every printed node, in the order printed."""
    tokens: list[int] | None = None
    nodes: list[Printed] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if (count := _N_TOKENS.search(line)) and tokens is None:
            n = int(count.group(1))
            ids = [_TOKEN_LINE.match(lines[i + 1 + k]) for k in range(n)] if i + n < len(lines) else []
            if len(ids) != n or not all(ids):
                raise ParseError(f"line {i + 1}: 'number of input tokens = {n}' is not followed by {n} token ids")
            tokens = [int(m.group(1)) for m in ids]
            i += n + 1
            continue
        header = _HEADER.match(line)
        if header is None:
            i += 1
            continue
        ne = tuple(int(x) for x in header["ne"].split(","))
        numbers: list[float] = []
        total = None
        i += 1
        while i < len(lines) and total is None:
            if _HEADER.match(lines[i]):
                break
            if summed := _SUM.match(lines[i]):
                total = float(summed.group(1))
            elif lines[i].lstrip().startswith("[") and "]" in lines[i]:
                numbers += [float(x) for x in _NUMBER.findall(lines[i])]
            i += 1
        kept = [printed_indices(n) for n in ne[:3]]
        shape = (ne[3], len(kept[2]), len(kept[1]), len(kept[0]))
        if total is None or len(numbers) != np.prod(shape):
            raise ParseError(f"node {header['name']!r} ({header['op']}): want {int(np.prod(shape))} printed values "
                             f"and a sum, found {len(numbers)} values{'' if total is not None else ' and no sum'}")
        values = np.full(ne[::-1], np.nan, dtype=np.float32)
        values[np.ix_(range(ne[3]), kept[2], kept[1], kept[0])] = np.array(numbers, dtype=np.float32).reshape(shape)
        nodes.append(Printed(header["name"], header["op"], header["src0"], ne, values, total))
    return tokens, nodes


def trace_name(node: Printed) -> tuple[str, int | None, int] | None:
    """(trace name, layer, ne axis of the positions) of a node, None for a node with no trace name."""
    if node.op == "MUL_MAT" and (out := _ATTN_OUTPUT.fullmatch(node.src0)):
        return "attn_out", int(out.group(1)), 1
    numbered = _LAYER_NAME.fullmatch(node.name)
    base, layer = (numbered["base"], int(numbered["layer"])) if numbered else (node.name, None)
    mapped = MAPPING.get((base, node.op))
    if mapped is None or (layer is None) != (mapped[0] in ("inp_embd", "result_norm", "result_output")):
        return None
    return mapped[0], layer, mapped[1]


def to_trace(tokens: list[int] | None, nodes: list[Printed], verbose: bool = False) -> Trace:
    """Place each mapped node's printed values at their trace positions ([T, ...], NaN elsewhere)."""
    embeddings = [n for n in nodes if (m := trace_name(n)) and m[0] == "inp_embd"]
    if len(embeddings) != 1:
        raise ParseError(f"want one embedding lookup (embd GET_ROWS), found {len(embeddings)}: "
                         "more than one batch? give llama.cpp a batch as long as the prompt (-b, -ub)")
    T = embeddings[0].ne[1]
    if tokens is not None and len(tokens) != T:
        raise ParseError(f"{len(tokens)} token ids printed but the graph has {T} positions")
    flat: dict[str, np.ndarray] = {}  # key -> [T, values per position]
    inner: dict[str, tuple[int, ...]] = {}  # key -> the trace shape after T, from the most-dimensional source
    sums: dict[str, list[float]] = {}
    for node in nodes:
        mapped = trace_name(node)
        if mapped is None:
            if verbose:
                print(f"skipped {node.name} {node.op} {{{', '.join(map(str, node.ne))}}}", file=sys.stderr)
            continue
        name, layer, axis = mapped
        key = trace_key(name, layer)
        rows = node.ne[axis]
        if any(n != 1 for n in node.ne[axis + 1:]) or rows > T:
            raise ParseError(f"{node.name} {node.op}: ne {node.ne} is not {{..., positions <= {T}}} on axis {axis}")
        shape = tuple(reversed(node.ne[:axis]))
        per_row = int(np.prod(shape))
        if key not in flat:
            flat[key] = np.full((T, per_row), np.nan, dtype=np.float32)
        elif flat[key].shape[1] != per_row:
            raise ParseError(f"{key}: {node.name} {node.op} has {per_row} values a position, "
                             f"an earlier node {flat[key].shape[1]}")
        if len(shape) > len(inner.get(key, ())):
            inner[key] = shape
        # after inp_out_ids, the output rows only: eval-callback outputs the last position
        block = flat[key][T - rows:]
        new = node.values.reshape(rows, per_row)
        both = ~np.isnan(block) & ~np.isnan(new)
        if not np.array_equal(block[both], new[both]):
            raise ParseError(f"{key}: {node.name} {node.op} disagrees with an earlier node of that name")
        block[~np.isnan(new)] = new[~np.isnan(new)]
        sums.setdefault(key, [T - rows, T, node.total])
    tensors = {key: flat[key].reshape(T, *inner[key]) for key in forward_order(flat)}
    metadata = {"source": SOURCE, "missing_values": "nan", "value_decimals": "4", "sums": json.dumps(sums)}
    if tokens is not None:
        metadata["tokens"] = json.dumps(tokens)
    return Trace(tensors, metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="llama-eval-callback's output (stdout and stderr in one file), - for stdin")
    parser.add_argument("--out", type=Path, required=True, help="trace file to write (.safetensors or .npz)")
    parser.add_argument("--verbose", action="store_true", help="list the nodes that have no trace name on stderr")
    args = parser.parse_args(argv)
    if args.out.suffix not in (".safetensors", ".npz"):
        parser.error(f"--out {args.out}: a trace is written as .safetensors or .npz")
    try:
        text = sys.stdin.read() if args.output == "-" else Path(args.output).read_text()
        trace = to_trace(*parse_output(text.splitlines()), verbose=args.verbose)
    except (OSError, ParseError) as exc:
        sys.exit(f"error: {exc}")
    save_trace(args.out, trace)
    printed = sum(int(np.count_nonzero(~np.isnan(t))) for t in trace.tensors.values())
    print(f"wrote {len(trace.tensors)} tensors ({printed} printed values) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
