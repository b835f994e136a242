"""`qwen-ref suite make` and `suite check` end to end on the full-vocabulary fixture with the real Qwen1.5
tokenizer: the reference files are right and reproducible (locally, on a 2-worker cluster, after a kill),
qwen-ref's own outputs are exact, a 16-bit KV cache drifts, a shifted engine is wrong, transformers is
exact, and a tokenizer mismatch is refused in one line."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from qwen_ref import cli
from qwen_ref.backends import get_backend
from qwen_ref.compare import compare_logits, log_softmax
from qwen_ref.fingerprint import tokenizer_hash
from qwen_ref.generation import logits_for_tokens
from qwen_ref.model import load_model
from qwen_ref.suite_engine import engine_line, tokenizer_line
from qwen_ref.suite_judge import TAIL_EPS, judge_case
from qwen_ref.verdict import Grade, judge

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    {"id": "chat", "text": "Hello, how are you today?", "chat": True},
    {"text": "The capital of France is"},
    {"id": "ids", "tokens": [1, 2, 3, 4, 5, 151643, 9707, 11]},
    {"id": "unicode", "text": "Grüße aus Zürich, 東京から"},
]


def qwen_ref(*args, **kwargs):
    env = os.environ | {"PYTHONPATH": str(REPO)}  # this tree's qwen_ref, wherever the package is installed
    return subprocess.run([sys.executable, "-m", "qwen_ref", *map(str, args)], check=False, capture_output=True,
                          text=True, env=env, **kwargs)


def write_jsonl(path: Path, items) -> Path:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def suite(text_model, tmp_path_factory):
    """(model dir, prompts file, suite dir) made in this process by `qwen-ref suite make`."""
    root = tmp_path_factory.mktemp("suite")
    prompts = write_jsonl(root / "prompts.jsonl", PROMPTS)
    assert cli.main(["suite", "make", "--model", str(text_model), str(prompts), "--out", str(root / "ref"),
                     "--quiet"]) == 0
    return text_model, prompts, root / "ref"


def engine_outputs(path: Path, suite_dir: Path, model_dir: Path, kv_dtype: str = "float32", shift: int = 0,
                   backend: str = "numba", compare_with: list | None = None) -> Path:
    """qwen-ref itself as the engine under test: top-40 of its log-probabilities per position.

    `shift` hands out position t + shift's distribution at t (an off-by-one engine) where it exists.
    `compare_with` receives, per case, `qwen-ref compare`'s grade of these logits against the numba float32 ones."""
    manifest = json.loads((suite_dir / "manifest.json").read_text())
    model = load_model(model_dir, get_backend(backend), kv_dtype=kv_dtype)
    reference = load_model(model_dir, get_backend("numba")) if compare_with is not None else None
    lines = [tokenizer_line(**{k: manifest["tokenizer"][k] for k in ("sha256", "special_tokens", "eos_token_id")})]
    for case in map(json.loads, (suite_dir / "cases.jsonl").read_text().splitlines()):
        logits = logits_for_tokens(model, case["tokens"])  # [T, V]
        logprobs = log_softmax(logits)  # [T, V]
        if reference is not None:
            compare_with.append(judge(compare_logits(logits_for_tokens(reference, case["tokens"]), logits)).grade)
        if shift:
            logprobs = np.concatenate([logprobs[shift:], logprobs[-shift:]])  # [T, V]
        lines.append(engine_line(case["id"], case["tokens"], logprobs, top_n=40))
    path.write_text("".join(lines))
    return path


def check_json(capsys, suite_dir: Path, other: Path, *flags: str) -> tuple[int, dict]:
    """`qwen-ref suite check --json` in this process (a subprocess would add seconds of imports per call)."""
    capsys.readouterr()
    code = cli.main(["suite", "check", str(suite_dir), str(other), "--json", *flags])
    captured = capsys.readouterr()
    assert code in (0, 1), captured.err
    return code, json.loads(captured.out)


def test_reference_files_hold_the_top_k_tail_and_next_token_of_the_full_logits(suite):
    model_dir, _, suite_dir = suite
    manifest = json.loads((suite_dir / "manifest.json").read_text())
    assert [c["id"] for c in manifest["cases"]] == ["chat", "line 2", "ids", "unicode"]
    assert manifest["tokenizer"]["sha256"] == tokenizer_hash(model_dir)
    assert manifest["tokenizer"]["eos_token_id"] == 151645  # <|im_end|>, tokenizer_config.json's eos_token
    assert manifest["top_k"] == 20 and manifest["kv_dtype"] == "float32"
    cases = [json.loads(line) for line in (suite_dir / "cases.jsonl").read_text().splitlines()]
    assert cases[0]["tokens"][-3:] == [151644, 77091, 198]  # the chat case ends in "<|im_start|>assistant\n"

    model = load_model(model_dir, get_backend("numba"))
    for case, entry in zip(cases, manifest["cases"]):
        ref = np.load(suite_dir / entry["file"])
        logp = log_softmax(logits_for_tokens(model, case["tokens"]))  # [T, V]
        T = len(case["tokens"])
        assert str(ref["id"]) == case["id"] and ref["tokens"].tolist() == case["tokens"]
        expected = np.sort(logp, axis=-1)[:, ::-1][:, :20]  # [T, 20]
        np.testing.assert_array_equal(ref["top_logprobs"], expected)
        np.testing.assert_array_equal(np.take_along_axis(logp, ref["top_ids"].astype(np.int64), -1), expected)
        # top-K and tail together are the whole distribution: float64 sums of 152k terms, ~1e-16 each
        total = np.logaddexp(np.logaddexp.reduce(ref["top_logprobs"], axis=-1), ref["tail_logprob"])  # [T]
        np.testing.assert_allclose(total, 0.0, atol=1e-12)
        np.testing.assert_array_equal(ref["next_logprob"], logp[np.arange(T - 1), case["tokens"][1:]])


def test_a_second_run_writes_the_same_bytes_and_a_rerun_computes_nothing(suite, tmp_path):
    model_dir, prompts, suite_dir = suite
    again = tmp_path / "again"
    assert cli.main(["suite", "make", "--model", str(model_dir), str(prompts), "--out", str(again), "--quiet"]) == 0
    assert files_of(again) == files_of(suite_dir)
    result = qwen_ref("suite", "make", "--model", model_dir, prompts, "--out", again)
    assert result.returncode == 0, result.stderr
    assert "4 of 4 cases already" in result.stderr and "0 computed" in result.stderr


def test_full_logits_are_kept_on_request(text_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"tokens": [9707, 11, 1246, 525]}])
    assert cli.main(["suite", "make", "--model", str(text_model), str(prompts), "--out", str(tmp_path / "s"),
                     "--full-logits", "--quiet"]) == 0
    ref = np.load(tmp_path / "s" / "case-00000.npz")
    model = load_model(text_model, get_backend("numba"))
    np.testing.assert_array_equal(ref["logits"], logits_for_tokens(model, [9707, 11, 1246, 525]))


def test_a_folder_of_another_suite_is_refused_in_one_line(suite):
    model_dir, prompts, suite_dir = suite
    result = qwen_ref("suite", "make", "--model", model_dir, prompts, "--out", suite_dir, "--top-k", "5")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [(
        f"qwen-ref: error: {suite_dir} holds a suite made from other inputs ('top_k' differs): "
        "use another --out, or delete it to start over")]


@pytest.fixture(scope="module")
def own_outputs(suite, tmp_path_factory):
    model_dir, _, suite_dir = suite
    return engine_outputs(tmp_path_factory.mktemp("own") / "own.jsonl", suite_dir, model_dir)


def test_qwen_refs_own_outputs_are_exact_to_the_last_bit(suite, own_outputs, capsys):
    code, out = check_json(capsys, suite[2], own_outputs, "--accept", "exact")
    assert code == 0 and out["ok"]
    assert [c["verdict"] for c in out["cases"]] == ["EXACT"] * 4
    # the same float64 values through JSON (repr round-trips): nothing differs at all
    assert max(c["max_abs_delta"] for c in out["cases"]) == 0.0
    assert all(c["missing"] == 0 and c["overlap_min"] == 1.0 for c in out["cases"])


def test_an_engine_without_the_last_positions_distribution_is_judged_on_the_others(suite, own_outputs, tmp_path,
                                                                                    capsys):
    lines = [json.loads(line) for line in own_outputs.read_text().splitlines()]
    for case in lines[1:]:
        case["top_logprobs"].pop()  # as prompt-logprob APIs give them: none after the last token
    code, out = check_json(capsys, suite[2], write_jsonl(tmp_path / "short.jsonl", lines), "--accept", "exact")
    assert code == 0
    assert [c["positions"] for c in out["cases"]] == [len(case["tokens"]) - 1 for case in lines[1:]]


def test_a_bfloat16_kv_cache_drifts_and_fails_accept_exact_only(suite, tmp_path, capsys):
    model_dir, _, suite_dir = suite
    other = engine_outputs(tmp_path / "bf16kv.jsonl", suite_dir, model_dir, kv_dtype="bfloat16")
    code, out = check_json(capsys, suite_dir, other)
    assert code == 0 and out["accept"] == "DRIFT"
    verdicts = [c["verdict"] for c in out["cases"]]
    assert "WRONG" not in verdicts and "DRIFT" in verdicts
    drifted = [c for c in out["cases"] if c["verdict"] == "DRIFT"]
    # bfloat16 keys and values round at 2^-8: logprobs move by more than the exact bound, KL stays small
    assert all(c["max_abs_delta"] > c["tolerance"] for c in drifted)
    assert max(c["kl_max"] for c in out["cases"]) < 0.05  # 10x below DRIFT_KL_MAX: drift by a wide margin
    code, _ = check_json(capsys, suite_dir, other, "--accept", "exact")
    assert code == 1


def test_a_float16_kv_cache_is_drift_in_every_case_as_compare_grades_it(suite, tmp_path, capsys):
    model_dir, _, suite_dir = suite
    graded_by_compare = []
    other = engine_outputs(tmp_path / "f16kv.jsonl", suite_dir, model_dir, kv_dtype="float16",
                           compare_with=graded_by_compare)
    _, out = check_json(capsys, suite_dir, other)
    # float16 keys and values (rounding unit 2^-11) move the logits by 1e-3 to 1e-2 of their scale, above
    # compare's rtol of 1e-4; the old absolute bound of 1e-3 nats called the 5-token case EXACT (8e-4)
    assert [c["verdict"] for c in out["cases"]] == ["DRIFT"] * 4
    assert graded_by_compare == [Grade.DRIFT] * 4


def test_the_numpy_backend_against_a_numba_suite_is_exact_as_compare_grades_it(suite, tmp_path, capsys):
    model_dir, _, suite_dir = suite
    graded_by_compare = []
    other = engine_outputs(tmp_path / "numpy.jsonl", suite_dir, model_dir, backend="numpy",
                           compare_with=graded_by_compare)
    code, out = check_json(capsys, suite_dir, other, "--accept", "exact")
    assert code == 0 and [c["verdict"] for c in out["cases"]] == ["EXACT"] * 4
    assert graded_by_compare == [Grade.EXACT] * 4
    # float32 summed in another order: ~3e-6 nats against a tolerance of ~7e-4, two orders to spare
    assert max(c["max_abs_delta"] / c["tolerance"] for c in out["cases"]) < 0.05


def test_the_drift_thresholds_are_flags(suite, tmp_path, capsys):
    model_dir, _, suite_dir = suite
    other = engine_outputs(tmp_path / "bf16kv.jsonl", suite_dir, model_dir, kv_dtype="bfloat16")
    code, out = check_json(capsys, suite_dir, other, "--drift-kl-max", "0")
    assert code == 1 and out["thresholds"]["kl_max"] == 0.0
    assert all(c["verdict"] in ("EXACT", "WRONG") for c in out["cases"])
    code, out = check_json(capsys, suite_dir, other, "--rtol", "1")  # everything within max|logit|: EXACT
    assert code == 0 and all(c["verdict"] == "EXACT" for c in out["cases"])


def test_outputs_without_a_tokenizer_line_warn_that_only_token_ids_are_compared(suite, own_outputs, tmp_path):
    other = tmp_path / "no_header.jsonl"
    other.write_text("".join(own_outputs.read_text().splitlines(keepends=True)[1:]))
    result = qwen_ref("suite", "check", suite[2], other)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        (f"warning: {other} states no tokenizer (no first {{\"tokenizer\": ...}} line): the tokenizer metadata "
        "check is skipped, only the token ids are compared")]


def test_an_off_by_one_engine_is_wrong(suite, tmp_path, capsys):
    model_dir, _, suite_dir = suite
    other = engine_outputs(tmp_path / "shifted.jsonl", suite_dir, model_dir, shift=1)
    result = qwen_ref("suite", "check", suite_dir, other)
    assert result.returncode == 1
    assert "accept DRIFT: FAIL" in result.stdout
    _, out = check_json(capsys, suite_dir, other)
    assert all(c["verdict"] == "WRONG" for c in out["cases"])


def test_the_transformers_recipe_is_exact(suite, tmp_path, capsys, torch_reference):
    model_dir, _, suite_dir = suite
    out_file = tmp_path / "hf.jsonl"
    result = subprocess.run([sys.executable, REPO / "tools" / "suite_outputs_transformers.py", suite_dir, model_dir,
                             "--out", out_file], check=False, capture_output=True, text=True,
                            env=os.environ | {"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    code, out = check_json(capsys, suite_dir, out_file, "--accept", "exact")
    assert code == 0, out
    # float32 on both sides, summed in another order: ~1e-6 here, far inside the exact bound (~7e-4 here)
    assert max(c["max_abs_delta"] for c in out["cases"]) < 1e-4


@pytest.mark.parametrize("change", ["sha256", "special_token", "token_ids"])
def test_a_tokenizer_mismatch_is_refused_in_one_line(suite, own_outputs, tmp_path, change):
    lines = own_outputs.read_text().splitlines()
    header, first = json.loads(lines[0]), json.loads(lines[1])
    if change == "sha256":
        header["tokenizer"]["sha256"] = "0" * 64
    elif change == "special_token":
        header["tokenizer"]["special_tokens"]["<|im_end|>"] = 151643
    else:
        first["tokens"][3] += 1
    other = write_jsonl(tmp_path / "bad.jsonl", [header, first] + [json.loads(line) for line in lines[2:]])
    result = qwen_ref("suite", "check", suite[2], other)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("qwen-ref: error: tokenizer mismatch: ")


def test_a_two_worker_cluster_writes_the_local_runs_bytes(suite, tmp_path):
    if os.environ.get("QWEN_REF_REQUIRE_CLUSTER") != "1":
        pytest.importorskip("distributed")
    model_dir, prompts, suite_dir = suite
    result = qwen_ref("suite", "make", "--model", model_dir, prompts, "--out", tmp_path / "cl", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert files_of(tmp_path / "cl") == files_of(suite_dir)


def _kill_suite_make_midway(text_model, tmp_path, n_cases: int, seed: int, *options: str,
                            watch: Callable[[int], None] = lambda pid: None) -> tuple[Path, Path, Path, int]:
    """A whole `suite make` of n_cases prompts of 80 tokens, then the same run SIGKILLed once 3 case files
    exist (`watch` sees its pid at every poll); returns (prompts, whole, killed, cases done)."""
    rng = np.random.default_rng(seed)
    prompts = write_jsonl(tmp_path / "p.jsonl",
                          [{"id": f"c{i}", "tokens": rng.integers(0, 151643, 80).tolist()} for i in range(n_cases)])
    whole = tmp_path / "whole"
    assert cli.main(["suite", "make", "--model", str(text_model), str(prompts), "--out", str(whole), "--quiet"]) == 0

    killed = tmp_path / "killed"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "qwen_ref", "suite", "make", "--model", str(text_model),
                             str(prompts), "--out", str(killed), *options, "--quiet"], env=env)
    deadline = time.monotonic() + 120
    while len(list(killed.glob("case-*.npz"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        watch(proc.pid)
        time.sleep(0.01)
    watch(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(killed.glob("case-*.npz")))
    assert 3 <= done < n_cases, f"the kill should land mid-suite, {done} of {n_cases} cases were done"
    return prompts, whole, killed, done


def _resume_gives_the_whole_runs_files(text_model, prompts: Path, whole: Path, killed: Path, done: int, n_cases: int):
    result = qwen_ref("suite", "make", "--model", text_model, prompts, "--out", killed)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {done} of {n_cases} cases already" in result.stderr
    assert {k: v for k, v in files_of(killed).items() if not k.startswith(".")} == files_of(whole)


def test_a_killed_run_resumes_and_writes_the_same_files(text_model, tmp_path):
    # 10 cases: ~0.2 s each to compute and compact, so the kill lands mid-suite
    prompts, whole, killed, done = _kill_suite_make_midway(text_model, tmp_path, 10, 0)
    _resume_gives_the_whole_runs_files(text_model, prompts, whole, killed, done, 10)


def test_kl_is_reference_to_other_over_top_k_and_a_tail_bucket():
    ref_ids = np.array([[7, 3]])  # [T=1, K=2]
    ref_lp = np.log([[0.7, 0.1]])  # tail 0.2
    ref_tail = np.log([0.2])
    other = [(np.array([3, 7, 9]), np.log([0.6, 0.2, 0.1]))]  # tail: 1 - 0.8 = 0.2 (0.1 of it listed)
    report = judge_case("x", ref_ids, ref_lp, ref_tail, np.array([1.0]), other)
    expected = 0.7 * np.log(0.7 / 0.2) + 0.1 * np.log(0.1 / 0.6) + 0.2 * np.log(0.2 / 0.2)
    reverse = 0.2 * np.log(0.2 / 0.7) + 0.6 * np.log(0.6 / 0.1)  # KL(other || ref): not this
    assert report.kl_max == pytest.approx(expected, rel=1e-12)
    assert abs(report.kl_max - reverse) > 0.1
    assert report.top1_exact_agree == 0 and report.overlap_min == 1.0


def test_an_unlisted_reference_token_is_valued_at_the_engines_smallest_listed_logprob():
    ref_ids = np.array([[1, 2, 3]])  # [T=1, K=3]
    ref_lp = np.log([[0.6, 0.3, 0.05]])
    other = [(np.array([1, 2, 8]), np.log([0.6, 0.3, 0.02]))]  # token 3 not listed: at most log 0.02
    report = judge_case("x", ref_ids, ref_lp, np.log([0.05]), np.array([1.0]), other)
    assert report.missing == 1
    assert report.max_abs_delta == pytest.approx(np.log(0.05) - np.log(0.02), rel=1e-12)
    assert report.max_abs_delta_at == (0, 3)
    assert report.verdict == Grade.WRONG  # top-K overlap 2/3, under DRIFT_OVERLAP


def test_a_prompts_file_with_a_repeated_id_is_refused_in_one_line(text_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "tokens": [1]}])
    result = qwen_ref("suite", "make", "--model", text_model, prompts, "--out", tmp_path / "o")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"qwen-ref: error: {prompts}: line 2: id 'a' repeats line 1"]


STAND_IN_LLAMA_CPP = '''
"""A stand-in for llama_cpp.Llama with the interface of llama-cpp-python 0.3.36 that the recipe uses
(reset, eval filling scores[n_past:n_past+n] under logits_all, n_tokens, token_eos, tokenize), computing
with qwen-ref."""
import numpy as np
from qwen_ref.backends import get_backend
from qwen_ref.generation import logits_for_tokens
from qwen_ref.model import load_model
from qwen_ref.tokenizer import Tokenizer


class Llama:
    def __init__(self, model_path, n_ctx, n_batch, logits_all, n_threads, verbose):
        assert logits_all
        self._model = load_model(model_path, get_backend("numba"))  # the reference's backend
        self._tok = Tokenizer.from_model_dir(model_path)
        self.scores = np.zeros((n_ctx, self._model.config.vocab_size), dtype=np.single)
        self.n_tokens = 0
        self._ids = []

    def reset(self):
        self.n_tokens = 0
        self._ids = []

    def eval(self, tokens):
        self._ids += list(tokens)
        self.scores[: len(self._ids)] = logits_for_tokens(self._model, self._ids)
        self.n_tokens = len(self._ids)

    def token_eos(self):
        return 151645

    def tokenize(self, text, add_bos=True, special=False):
        assert special and not add_bos
        return [self._tok.token_id(text.decode())]
'''


def test_the_llama_cpp_recipe_against_a_stand_in_for_llama_cpp_python(suite, tmp_path, capsys):
    """The recipe's own logic only: llama-cpp-python is not installed here, so a stand-in with the
    0.3.36 interface computes with qwen-ref (whose outputs are exact), and the real library is untested."""
    model_dir, _, suite_dir = suite
    (tmp_path / "llama_cpp.py").write_text(STAND_IN_LLAMA_CPP)
    out_file = tmp_path / "llamacpp.jsonl"
    result = subprocess.run([sys.executable, REPO / "tools" / "suite_outputs_llamacpp.py", suite_dir, model_dir,
                             "--out", out_file], check=False, capture_output=True, text=True,
                            env=os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert result.returncode == 0, result.stderr
    assert json.loads(out_file.read_text().splitlines()[0])["tokenizer"]["special_tokens"]["<|im_end|>"] == 151645
    code, out = check_json(capsys, suite_dir, out_file, "--accept", "exact")
    assert code == 0 and max(c["max_abs_delta"] for c in out["cases"]) == 0.0


def test_a_peaked_row_whose_listed_probabilities_sum_past_1_is_exact_not_a_crash():
    """An engine listing exactly the K tokens of a peaked row: its tail 1 - sum p is 0 or negative by
    rounding (math.log raised "math domain error", exit 3). The tail is then below what K float64 terms
    resolve, so it takes the reference's own (tiny) tail, and a faithful engine stays EXACT."""
    ref_lp = np.array([[-1e-12, -30.0, -31.0]])  # [T=1, K=3]: a peaked row
    ref_tail = np.log([-np.expm1(np.logaddexp.reduce(ref_lp[0]))])  # ~1e-12
    for engine_lp in ([1e-13, -30.0, -31.0], [0.0, -30.0, -31.0], list(ref_lp[0])):  # sums >= 1, = 1, exact
        report = judge_case("x", np.array([[5, 6, 7]]), ref_lp, ref_tail, np.array([40.0]),
                            [(np.array([5, 6, 7]), np.array(engine_lp))])
        assert np.isfinite(report.kl_max) and report.kl_max < 1e-11, engine_lp
        assert report.verdict == Grade.EXACT


def test_an_engine_tail_below_float_resolution_is_bounded_not_zero():
    """Listing exactly K tokens summing to 1 while the reference holds 1% outside them: a real error,
    judged with the engine's tail at the resolution floor (K * eps), not log(0) = inf."""
    ref_lp = np.log([[0.89, 0.1]])  # tail 0.01
    other = [(np.array([1, 2]), np.log([0.9, 0.1]))]  # the engine's tail: 0
    report = judge_case("x", np.array([[1, 2]]), ref_lp, np.log([0.01]), np.array([3.0]), other)
    floor = 2 * TAIL_EPS
    expected = 0.89 * np.log(0.89 / 0.9) + 0.01 * np.log(0.01 / floor)
    assert report.kl_max == pytest.approx(expected, rel=1e-9)


def test_an_engine_top1_outside_the_reference_top_k_is_no_near_tie():
    """Its reference margin is unknown (at least the gap to the K-th token, which may be 0): not a near-tie."""
    ref_lp = np.log([[0.3, 0.3]])  # [T=1, K=2]: the K-th token ties the first
    other = [(np.array([9, 1, 2]), np.log([0.31, 0.3, 0.29]))]  # the engine's top-1, 9, is outside
    report = judge_case("x", np.array([[1, 2]]), ref_lp, np.log([0.4]), np.array([1.0]), other)
    assert report.top1_agree == 0 and report.top1_exact_agree == 0
    assert report.verdict == Grade.WRONG


def _descendants(pid: int) -> list[int]:
    import psutil
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_a_killed_cluster_run_leaves_no_workers_and_resumes_to_the_local_runs_bytes(text_model, tmp_path):
    if os.environ.get("QWEN_REF_REQUIRE_CLUSTER") != "1":
        pytest.importorskip("distributed")
    psutil = pytest.importorskip("psutil")
    workers: set[int] = set()  # the nannies and workers, seen while they run
    # 16 cases, two at a time on two workers: the kill lands mid-suite
    prompts, whole, killed, done = _kill_suite_make_midway(text_model, tmp_path, 16, 1, "--workers", "2",
                                                           watch=lambda pid: workers.update(_descendants(pid)))
    assert workers, "the driver started no worker processes"

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10  # the nannies notice their parent's death within a second or so
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:  # do not leak them into the rest of the session, whatever the assertion says
        psutil.Process(pid).kill()
    assert not left, f"{len(left)} of the cluster's {len(workers)} processes outlived the killed driver"
    _resume_gives_the_whole_runs_files(text_model, prompts, whole, killed, done, 16)
