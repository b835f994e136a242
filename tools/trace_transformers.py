"""A named trace of transformers' Qwen2ForCausalLM: the same keys and shapes as `qwen-ref trace` writes.

    python tools/trace_transformers.py --model DIR --tokens 1,2,3 --out hf.safetensors [--layers 0-1] [--names 'Qcur*']

The checkpoint runs in float32 with eager attention, one forward pass over the tokens at positions
0..T-1. Forward hooks read each intermediate where transformers makes it (modeling_qwen2.py):
    inp_embd       embed_tokens output
    attn_norm      input_layernorm output
    Qcur Kcur Vcur q_proj, k_proj, v_proj outputs (bias included), as [T, heads, hd]
    kqv_out        o_proj input;  attn_out  o_proj output
    ffn_inp        post_attention_layernorm input: transformers' own residual sum x + attn_out
    ffn_norm       post_attention_layernorm output
    ffn_gate       gate_proj output;  ffn_up  up_proj output
    ffn_act        down_proj input;  ffn_out  down_proj output
    l_out          decoder layer output
    result_norm    model.norm output;  result_output  lm_head output
RoPE has no module: Qwen2Attention.forward calls `apply_rotary_pos_emb` on tensors no hook sees. So
Qcur_rope and Kcur_rope are that same function applied to the hooked q/k_proj outputs with the
(cos, sin) the layer was given (a pre-hook on self_attn reads its `position_embeddings` argument):
the same inputs through the same function as inside the attention, so the same values, with no
patching of transformers' module globals.

Selection (--layers, --names) is qwen_ref.trace.Recorder's: layers as "0-3,7", names as comma-separated
fnmatch patterns over the trace names. Needs only the `reference` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this tree's qwen_ref, whatever is installed

from qwen_ref.errors import QwenRefError
from qwen_ref.fingerprint import checkpoint_hash
from qwen_ref.trace import Recorder, Trace, parse_layers, parse_names, save_trace


def record_transformers(model, tokens: list[int], recorder: Recorder) -> dict[str, str]:
    """Run `model` (a float32 Qwen2ForCausalLM) on `tokens`, handing every named intermediate to `recorder`.

    Returns the trace metadata: source, versions, token ids.
    """
    import torch
    import transformers
    from transformers.models.qwen2 import modeling_qwen2

    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads

    def keep(name: str, layer: int | None, value) -> None:
        recorder.record(name, layer, value.detach()[0].numpy())  # drop the batch axis: [T, ...]

    def output_hook(name: str, layer: int | None):
        return lambda module, args, output: keep(name, layer, output)

    def input_hook(name: str, layer: int | None):
        return lambda module, args: keep(name, layer, args[0])

    hooks = []

    def on(module, name: str, layer: int | None, where: str = "output") -> None:
        if recorder.wants(name, layer):
            hooks.append(module.register_forward_pre_hook(input_hook(name, layer)) if where == "input"
                         else module.register_forward_hook(output_hook(name, layer)))

    on(model.model.embed_tokens, "inp_embd", None)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        on(layer.input_layernorm, "attn_norm", i)
        on(attn.o_proj, "kqv_out", i, "input")
        on(attn.o_proj, "attn_out", i)
        on(layer.post_attention_layernorm, "ffn_inp", i, "input")
        on(layer.post_attention_layernorm, "ffn_norm", i)
        on(mlp.gate_proj, "ffn_gate", i)
        on(mlp.up_proj, "ffn_up", i)
        on(mlp.down_proj, "ffn_act", i, "input")
        on(mlp.down_proj, "ffn_out", i)
        on(layer, "l_out", i)
        hooks.extend(_attention_hooks(attn, i, n_heads, n_kv, keep, recorder, modeling_qwen2.apply_rotary_pos_emb))
    on(model.model.norm, "result_norm", None)
    on(model.lm_head, "result_output", None)
    try:
        with torch.no_grad():
            model(torch.tensor([tokens], dtype=torch.long), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {
        "source": "transformers",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokens": json.dumps(tokens),
    }


def _attention_hooks(attn, layer: int, n_heads: int, n_kv: int, keep, recorder: Recorder, apply_rope) -> list:
    """Hooks for Qcur, Kcur, Vcur ([T, heads, hd]) and Qcur_rope, Kcur_rope (see the module docstring)."""
    hd = attn.head_dim
    wanted = [n for n in ("Qcur", "Kcur", "Vcur", "Qcur_rope", "Kcur_rope") if recorder.wants(n, layer)]
    if not wanted:
        return []
    seen: dict[str, object] = {}

    def projection(name: str, heads: int):
        def hook(module, args, output):
            seen[name] = output.view(*output.shape[:-1], heads, hd)  # [1, T, heads, hd]
            if name in wanted:
                keep(name, layer, seen[name])
        return hook

    def rope(module, args, kwargs, output):
        cos, sin = kwargs["position_embeddings"]  # [1, T, hd] each
        # apply_rotary_pos_emb wants [1, heads, T, hd] as the attention holds them (unsqueeze_dim=1)
        q, k = apply_rope(seen["Qcur"].transpose(1, 2), seen["Kcur"].transpose(1, 2), cos, sin)
        for name, value in (("Qcur_rope", q), ("Kcur_rope", k)):
            if name in wanted:
                keep(name, layer, value.transpose(1, 2))  # [1, T, heads, hd]

    hooks = [attn.q_proj.register_forward_hook(projection("Qcur", n_heads)),
             attn.k_proj.register_forward_hook(projection("Kcur", n_kv)),
             attn.v_proj.register_forward_hook(projection("Vcur", n_kv))]
    if "Qcur_rope" in wanted or "Kcur_rope" in wanted:
        hooks.append(attn.register_forward_hook(rope, with_kwargs=True))
    return hooks


def load_float32_eager(model_dir: Path):
    """The checkpoint as transformers runs it for a trace: float32 weights (widened on load), eager attention."""
    import torch
    import transformers

    model = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder (config.json, *.safetensors)")
    parser.add_argument("--tokens", required=True, help="token ids separated by commas, e.g. 1,2,3")
    parser.add_argument("--out", type=Path, required=True, help="trace file to write (.safetensors or .npz)")
    parser.add_argument("--layers", metavar="A-B,C", help="layers to record, 0-based, ranges inclusive (default: all)")
    parser.add_argument("--names", metavar="PATTERNS",
                        help="comma-separated fnmatch patterns of names to record, e.g. 'Qcur*,l_out' (default: all)")
    args = parser.parse_args(argv)
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        parser.error(f"--tokens {args.tokens!r}: want integers separated by commas")
    if args.out.suffix not in (".safetensors", ".npz"):
        parser.error(f"--out {args.out}: a trace is written as .safetensors or .npz")
    model = load_float32_eager(args.model)
    try:
        layers = None if args.layers is None else parse_layers(args.layers, model.config.num_hidden_layers)
        recorder = Recorder(layers, None if args.names is None else parse_names(args.names))
    except QwenRefError as exc:
        parser.error(str(exc))
    metadata = record_transformers(model, tokens, recorder) | {"checkpoint_sha256": checkpoint_hash(args.model)}
    tensors = recorder.tensors()
    save_trace(args.out, Trace(tensors, metadata))
    print(f"wrote {len(tensors)} tensors for {len(tokens)} tokens to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
