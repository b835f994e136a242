"""tools/bench_figures.paired_fractions on hand-made measurements: a decode that read its ceiling in its own
process beside each repeat, and one of an older run that has only the round's separate reads.

The expected figures are computed here from the inputs by the arithmetic the report states (tokens/s over
rate x 1e9 / bytes per token), so a change of method shows up as a failure, not as a new number.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from bench_figures import paired_fractions
from bench_plan import Plan

PLAN = Plan(shapes=("tiny",), dtypes=("bf16",), headline="tiny-bf16", contexts=(32,), prefill_prompts=(16,),
            paired_rounds=2)
BYTES = {"total": 1.0e9, "weights": 6.0e8, "kv_cache": 4.0e8}  # per token: a ceiling of R GB/s is R tokens/s


def read(stream: float, bf16: float) -> dict:
    return {"anon": stream, "anon-bf16": bf16}


def reads_apart(r: int, stream: tuple[float, float], bf16: tuple[float, float]) -> dict[str, dict]:
    """Round r's separate streaming reads, before and after its decodes."""
    out = {}
    for label, s, b in zip(("bandwidth", "bandwidth-after"), stream, bf16):
        out[f"paired/{r}/ceiling/{label}/anon/1t"] = {"median": s}
        out[f"paired/{r}/ceiling/{label}/anon-bf16/1t"] = {"median": b}
    return out


def bound(bf16: float, stream: float) -> float:
    return 1e9 / (BYTES["weights"] / min(bf16, stream) + BYTES["kv_cache"] / stream)


def test_paired_fractions_judge_each_repeat_beside_its_reads_and_fall_back_to_the_reads_apart():
    beside = [{"before": read(20.0, 20.0), "after": read(25.0, 22.0)},  # higher: 25 and 22
              {"before": read(40.0, 30.0), "after": read(30.0, 35.0)}]  # higher: 40 and 35
    measurements = {
        "paired/1/qwen-ref/numba/tiny-bf16/decode/1t": {"values": [10.0, 30.0], "median": 20.0, "beside": beside,
                                                        "bytes_per_token": BYTES},
        "paired/2/qwen-ref/numba/tiny-bf16/decode/1t": {"values": [12.0], "median": 12.0, "bytes_per_token": BYTES},
        **reads_apart(1, (50.0, 45.0), (41.0, 44.0)),
        **reads_apart(2, (24.0, 30.0), (20.0, 27.0)),
    }
    decode = paired_fractions(measurements, PLAN, 1)["decode"]
    first, second = decode["rounds"]

    # round 1: each repeat against the higher reading beside it, then medians over the repeats
    assert first["beside"] and first["qwen_ref"] == 20.0
    assert first["ceiling_rate"] == np.median([25.0, 40.0]) and first["ceiling"] == np.median([25.0, 40.0])
    assert first["fraction"] == np.median([10.0 / 25.0, 30.0 / 40.0])
    assert first["bf16_rate"] == np.median([22.0, 35.0])
    assert first["fraction_of_bound"] == np.median([10.0 / bound(22.0, 25.0), 30.0 / bound(35.0, 40.0)])
    assert first["apart_rate"] == 50.0 and first["apart_fraction"] == 20.0 / 50.0  # the reads a minute away

    # round 2 (an older run's result): its median against the higher of the separate reads
    assert not second["beside"] and "apart_rate" not in second
    assert second["ceiling_rate"] == 30.0 and second["fraction"] == 12.0 / 30.0
    assert second["bf16_bound"] == bound(27.0, 30.0) and second["fraction_of_bound"] == 12.0 / bound(27.0, 30.0)

    assert decode["median"] == np.median([first["fraction"], second["fraction"]])
    assert decode["median_apart_fraction"] == first["apart_fraction"]  # only the round that has both
    assert decode["bound_rounds"] == 2


def test_a_round_without_any_ceiling_is_left_out():
    measurements = {"paired/1/qwen-ref/numba/tiny-bf16/decode/1t": {"values": [10.0], "median": 10.0,
                                                                    "bytes_per_token": BYTES}}
    assert "decode" not in paired_fractions(measurements, PLAN, 1)
