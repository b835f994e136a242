#!/usr/bin/env bash
# A 32,000-token prompt on the Qwen1.5-0.5B shape, given from a file: `logits --last 64` and `generate`
# of 16 tokens, each timed by /usr/bin/time -v (wall time, peak resident memory). Writes the log to
# benchmarks/long_prompt.log; benchmarks/long_prompt.md quotes it.
#     bash tools/bench_long_prompt.sh [TOKENS]      # default 32000
set -euo pipefail
cd "$(dirname "$0")/.."
tokens=${1:-32000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log=benchmarks/long_prompt.log
{
  echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD), $(nproc) cores"
  lscpu | grep -E "Model name|^Flags" | cut -c1-400
  python tools/make_checkpoint.py --shape 0.5b --out "$work/model" > /dev/null
  python -c "import numpy as np; print(' '.join(map(str, np.random.default_rng(1).integers(0, 151643, $tokens))))" \
    > "$work/tokens.txt"
  /usr/bin/time -v python -m qwen_ref logits --model "$work/model" --tokens-file "$work/tokens.txt" --last 64 \
    --out "$work/last64.npz" --quiet 2>&1 | grep -E "Elapsed|Maximum resident|Exit status"
  /usr/bin/time -v python -m qwen_ref generate --model "$work/model" --tokens-file "$work/tokens.txt" \
    --max-new-tokens 16 --temperature 0 2>&1 > /dev/null | grep -E "Elapsed|Maximum resident|Exit status|prompt:"
} | tee "$log"
