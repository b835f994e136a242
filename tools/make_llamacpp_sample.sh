#!/bin/sh
# Regenerate tests/data/llamacpp/: llama-eval-callback's real output for a tiny random checkpoint (the
# full Qwen1.5 vocabulary and tokenizer, 2 layers, hidden 64, 4 query heads on 2 kv heads) and a prompt.
#
#     tools/make_llamacpp_sample.sh LLAMA_CPP_DIR
#
# LLAMA_CPP_DIR is a llama.cpp source tree with build/bin/llama-eval-callback built (see the recipe in
# tools/trace_llamacpp.py); its converter needs torch, transformers and sentencepiece importable (PYTHONPATH).
# The checkpoint is not stored: tools/make_checkpoint.py rebuilds it from its seed, and sample.json holds
# its sha256 so the test knows it rebuilt the same weights.
set -eu
LLAMA_CPP=$(cd "$1" && pwd)
PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT="$REPO/tests/data/llamacpp"
PROMPT="Hello world, this is"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" "$REPO/tools/make_checkpoint.py" --shape tiny --dtype float32 --seed 0 --out "$WORK/tiny-f32" >/dev/null
PYTHONPATH="$LLAMA_CPP/gguf-py${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$LLAMA_CPP/convert_hf_to_gguf.py" \
    "$WORK/tiny-f32" --outtype f32 --outfile "$WORK/tiny-f32.gguf" 2>"$WORK/convert.log"
# one thread, float32 KV cache, no flash attention (it rounds K and V to float16), stdout and log in order
"$LLAMA_CPP/build/bin/llama-eval-callback" -m "$WORK/tiny-f32.gguf" -p "$PROMPT" -t 1 -tb 1 -ctk f32 -ctv f32 \
    -fa off -c 64 >"$WORK/eval-callback.txt" 2>&1
mkdir -p "$OUT"
xz -9 -c "$WORK/eval-callback.txt" >"$OUT/eval-callback.txt.xz"
VERSION=$("$LLAMA_CPP/build/bin/llama-eval-callback" --version 2>&1 | head -1)
COMMIT=$(git -C "$LLAMA_CPP" rev-parse HEAD 2>/dev/null || echo unknown)
SHA=$(cd "$REPO" && "$PYTHON" -c "import sys; from qwen_ref.fingerprint import checkpoint_hash; print(checkpoint_hash(sys.argv[1]))" "$WORK/tiny-f32")
cat >"$OUT/sample.json" <<JSON
{
  "checkpoint": "python tools/make_checkpoint.py --shape tiny --dtype float32 --seed 0 --out DIR",
  "checkpoint_sha256": "$SHA",
  "prompt": "$PROMPT",
  "llama_cpp_version": "$VERSION",
  "llama_cpp_commit": "$COMMIT",
  "command": "llama-eval-callback -m tiny-f32.gguf -p \"$PROMPT\" -t 1 -tb 1 -ctk f32 -ctv f32 -fa off -c 64 > eval-callback.txt 2>&1"
}
JSON
echo "wrote $OUT/eval-callback.txt.xz and $OUT/sample.json" >&2
