"""The decode GEMV's inner loop for bfloat16 weights, written in LLVM IR so that it can prefetch.

A bfloat16 weight row, read as uint32 pairs, is dotted with x split into its even and odd elements
(`kernels.matmul._gemv`). Each 32 bytes of weights cost a load, a shift and a mask (`widen_bf16_pair`)
and two multiply-adds that load x: several times the instructions per byte of a float32 sum. On this
machine's cores that alone held the read back: a bfloat16 read ran at 0.81-0.86 of a float32 read of
the same bytes when the host's memory was fast, as each core keeps fewer cache lines in flight when it
has more instructions per line. Asking for each line 1 KB before it is read (`prefetcht0`, one per
64-byte line, interleaved with the loads) lifted the same loop to 0.88-0.97 (a C loop of this shape,
2 threads, 1 GiB of rows of 512 and 1408 pairs). Numba's loops cannot say this: LLVM does not
vectorise a loop that calls `llvm.prefetch`, and a loop split into chunks around the call sums each
chunk horizontally. So this loop is spelled out here, vector by vector. Against the loop LLVM
vectorised from Python (`widen_bf16_pair` in a reassociated sum), a GEMV over the same 1 GiB ran
1.02-1.06x faster on 2 threads and 1.05x on one, with the host at ~30 GB/s (alternating, medians of 12).

Per 32 pairs (128 bytes): two prefetches, four 8-lane loads of pairs, each widened by a shift (the
low words, elements 2j) and a mask (the high words, 2j + 1), and eight multiply-adds into four
accumulators (`llvm.fmuladd`: fused where the CPU has FMA, as `contract` allows in the other
kernels). The accumulators, then their lanes, are added in halves in a fixed order; a tail of fewer
than 32 pairs is added one pair at a time. The order is fixed for a given length: results are
reproducible and do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from kernels.widen import widen_bf16_pair

_PAIRS_PER_STEP = 32  # 128 bytes of weights: two cache lines, four AVX2 vectors
_PREFETCH_BYTES = 1024  # distance ahead: 1.02x here, where 512 gave 0.98x and 2048 1.00x (slower in C too)
_LANES = 8
_ACCUMULATORS = _PAIRS_PER_STEP // _LANES  # one per 8-lane vector of a step


def dot_bf16_pairs(w_pairs: np.ndarray, x_even: np.ndarray, x_odd: np.ndarray) -> np.float32:
    """sum_j widen(w[j]) * x[j] over bfloat16 words read in pairs: little-endian, so the low half of
    pair j is element 2j (times x_even[j]) and the high half element 2j + 1 (times x_odd[j]).

    This body runs under NUMBA_DISABLE_JIT; compiled code runs `_dot_ir`.
    """
    acc = np.float32(0.0)
    for j in range(w_pairs.shape[0]):
        low, high = widen_bf16_pair(w_pairs[j])
        acc += low * x_even[j] + high * x_odd[j]
    return acc


@overload(dot_bf16_pairs)
def _dot_bf16_pairs_jit(w_pairs, x_even, x_odd):
    if w_pairs.dtype == types.uint32 and x_even.dtype == types.float32 and x_odd.dtype == types.float32:
        return lambda w_pairs, x_even, x_odd: _dot_ir(w_pairs, x_even, x_odd)
    return None


def _contiguous_1d(a, dtype) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dtype


@intrinsic
def _dot_ir(typingctx, w_pairs, x_even, x_odd):
    """dot_bf16_pairs over C-contiguous 1-D arrays: w_pairs uint32 [n], x_even and x_odd float32 [>= n]."""
    if not (_contiguous_1d(w_pairs, types.uint32) and _contiguous_1d(x_even, types.float32)
            and _contiguous_1d(x_odd, types.float32)):
        return None

    def codegen(context, builder, signature, args):
        f32, i32 = ir.FloatType(), ir.IntType(32)
        words_t, floats_t = ir.VectorType(i32, _LANES), ir.VectorType(f32, _LANES)
        pairs_array = context.make_array(signature.args[0])(context, builder, args[0])
        w = pairs_array.data  # uint32*
        xe = context.make_array(signature.args[1])(context, builder, args[1]).data  # float*
        xo = context.make_array(signature.args[2])(context, builder, args[2]).data  # float*
        n = cgutils.unpack_tuple(builder, pairs_array.shape, 1)[0]  # intp
        intp = n.type
        fmuladd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(floats_t, [floats_t] * 3), f"llvm.fmuladd.v{_LANES}f32")
        i8p = ir.IntType(8).as_pointer()
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        shift = ir.Constant(words_t, [16] * _LANES)
        high_mask = ir.Constant(words_t, [0xFFFF0000] * _LANES)
        zero = ir.Constant(floats_t, [0.0] * _LANES)

        def vector(ptr, j, vtype):
            address = builder.bitcast(builder.gep(ptr, [j]), vtype.as_pointer())
            return builder.load(address, align=4)

        # main loop: j = 0, 32, ... while j + 32 <= n, four accumulators carried in phi nodes
        n_main = builder.and_(n, ir.Constant(intp, -_PAIRS_PER_STEP))
        entry = builder.block
        head = builder.append_basic_block("dot_head")
        body = builder.append_basic_block("dot_body")
        reduce = builder.append_basic_block("dot_reduce")
        builder.branch(head)
        builder.position_at_end(head)
        j = builder.phi(intp)
        accs = [builder.phi(floats_t) for _ in range(_ACCUMULATORS)]
        j.add_incoming(ir.Constant(intp, 0), entry)
        for a in accs:
            a.add_incoming(zero, entry)
        builder.cbranch(builder.icmp_signed("<", j, n_main), body, reduce)

        builder.position_at_end(body)
        ahead = builder.gep(builder.bitcast(w, i8p), [builder.add(builder.mul(j, ir.Constant(intp, 4)),
                                                                  ir.Constant(intp, _PREFETCH_BYTES))])
        for line in range(0, 4 * _PAIRS_PER_STEP, 64):  # each line of a step; read, high locality (prefetcht0), data
            builder.call(prefetch, [builder.gep(ahead, [ir.Constant(intp, line)]), ir.Constant(i32, 0),
                                    ir.Constant(i32, 3), ir.Constant(i32, 1)])
        new_accs = []
        for k, a in enumerate(accs):
            jk = builder.add(j, ir.Constant(intp, k * _LANES))
            pairs = vector(w, jk, words_t)
            low = builder.bitcast(builder.shl(pairs, shift), floats_t)  # elements 2j
            high = builder.bitcast(builder.and_(pairs, high_mask), floats_t)  # elements 2j + 1
            a = builder.call(fmuladd, [low, vector(xe, jk, floats_t), a])
            new_accs.append(builder.call(fmuladd, [high, vector(xo, jk, floats_t), a]))
        j_next = builder.add(j, ir.Constant(intp, _PAIRS_PER_STEP))
        j.add_incoming(j_next, body)
        for a, new in zip(accs, new_accs):
            a.add_incoming(new, body)
        builder.branch(head)

        builder.position_at_end(reduce)
        def halves_added(terms):  # (0 + n/2, 1 + n/2 + 1, ...), then the same again, down to one
            while len(terms) > 1:
                half = len(terms) // 2
                terms = [builder.fadd(terms[i], terms[i + half]) for i in range(half)]
            return terms[0]

        total = halves_added(accs)  # [8]
        lanes = [builder.extract_element(total, ir.Constant(i32, i)) for i in range(_LANES)]
        result = cgutils.alloca_once_value(builder, halves_added(lanes))

        # tail: the last n mod 32 pairs, one at a time
        with cgutils.for_range_slice(builder, n_main, n, ir.Constant(intp, 1), intp) as (t, _):
            pair = builder.load(builder.gep(w, [t]))
            low = builder.bitcast(builder.shl(pair, ir.Constant(i32, 16)), f32)
            high = builder.bitcast(builder.and_(pair, ir.Constant(i32, 0xFFFF0000)), f32)
            term = builder.fadd(builder.fmul(low, builder.load(builder.gep(xe, [t]))),
                                builder.fmul(high, builder.load(builder.gep(xo, [t]))))
            builder.store(builder.fadd(builder.load(result), term), result)
        return builder.load(result)

    return types.float32(w_pairs, x_even, x_odd), codegen
