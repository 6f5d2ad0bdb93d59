"""Rewards: the paper's math reward on known cases, the boxed grader, reasoning-gym scorers, and the
worker pool's hard timeout on pathological model output."""

import os
import signal
import threading
import time

import pytest

from tgpo_jax.data import DataConfig, load_rg_records
from tgpo_jax.rewards import (
    RewardFn,
    VerifierPool,
    boxed_equal,
    last_boxed,
    math_score,
    normalize_answer,
    rg_score,
    score_one,
)
from tgpo_jax.rewards.sandbox import check_sympy_code, literal_eval

# (response, ground truth, reward with think format, reward without think format)
MATH_CASES = [
    ("<think>3 of 4 parts</think> The answer is \\boxed{3/4}.", "0.75", 1, 1),  # fraction vs decimal
    ("<think>...</think> So \\boxed{0.75}", "\\frac{3}{4}", 1, 1),  # decimal vs latex fraction
    ("<think>...</think> \\boxed{\\dfrac{3}{4}}", "3/4", 1, 1),
    ("<think>...</think> \\boxed{2x+2}", "2(x+1)", 1, 1),  # equivalent algebra
    ("<think>...</think> \\boxed{(x-1)(x+1)}", "x^2-1", 1, 1),
    ("<think>...</think> \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1, 1),
    ("The answer is \\boxed{3/4}.", "3/4", 0, 1),  # missing </think>
    ("<think>so it is 42", "42", 0, 1),  # missing </think> (truncated thought)
    ("<think>...</think> The final answer is 42.", "42", 1, 1),  # missing box: math-verify still reads it
    ("<think>...</think> I could not solve it.", "42", 0, 0),  # missing box and no answer
    ("<think>...</think> \\boxed{43}", "42", 0, 0),  # wrong
    ("<think>...</think> \\boxed{3/5}", "0.75", 0, 0),  # wrong fraction
    ("<think>\\boxed{42}</think> \\boxed{41}", "42", 0, 0),  # right only inside the thought
    ("<think>...</think> \\boxed{2x+1}", "2(x+1)", 0, 0),  # wrong algebra
]


@pytest.mark.parametrize("text,gold,with_think,without_think", MATH_CASES)
def test_math_reward_known_cases(text, gold, with_think, without_think):
    assert math_score(text, gold, think_format=True) == with_think
    assert math_score(text, gold, think_format=False) == without_think


def test_boxed_extraction():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{{a}{b{c}}}") == "{a}{b{c}}"
    assert last_boxed("\\boxed{unclosed {x}") is None
    assert last_boxed("no box") is None
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("$\\boxed 5$") == "5"


@pytest.mark.parametrize(
    "pred,gold,ok",
    [
        ("\\boxed{3/4}", "\\frac{3}{4}", True),
        ("\\boxed{\\dfrac34}", "3/4", True),
        ("\\boxed{.5}", "0.5", True),
        ("\\boxed{\\text{Alice and Bob}}", "Alice and Bob", True),
        ("\\boxed{10^\\circ}", "10", True),
        ("\\boxed{x = 5}", "5", True),
        ("\\boxed{\\$5}", "5", True),
        ("\\boxed{2.50}", "2.5", True),
        ("\\boxed{0.75}", "3/4", False),  # a string grader does not do arithmetic
        ("\\boxed{43}", "42", False),
        ("42", "42", False),
        ("\\boxed{}", "", False),
    ],
)
def test_boxed_grader(pred, gold, ok):
    assert boxed_equal(pred, gold) is ok


def test_normalize_answer_is_idempotent():
    for s in ("\\left( 1, 2 \\right)", "\\tfrac12", "\\text{ yes }", "50\\%", "-3/7"):
        assert normalize_answer(normalize_answer(s)) == normalize_answer(s)


def test_boxed_is_the_or_fallback_of_evaluation():
    text, gold = "<think>...</think> \\boxed{\\text{Alice and Bob}}", "Alice and Bob"
    assert score_one(text, gold, {"think_format": True}) == 0.0  # math-verify alone rejects it
    assert score_one(text, gold, {"think_format": True, "boxed_fallback": True}) == 1.0


@pytest.fixture(scope="module")
def reward():
    with RewardFn(think_format=True, timeout_s=3.0, num_workers=2) as r:
        yield r


def test_worker_scores_match_in_process_and_submit_is_async(reward):
    texts, golds = [c[0] for c in MATH_CASES], [c[1] for c in MATH_CASES]
    t0 = time.perf_counter()
    fut = reward.submit_detailed(texts, golds)
    assert time.perf_counter() - t0 < 0.5  # returns before scoring (worker start-up alone takes longer)
    res = fut.result(timeout=60)
    assert res.scores.tolist() == [float(c[2]) for c in MATH_CASES]
    assert res.scores.dtype.name == "float32" and not res.timed_out.any() and not res.failed.any()


ADVERSARIAL = {
    "huge exponent": "<think>x</think> \\boxed{9^{9^{9^{9}}}}",
    "huge exponent, plain": "<think>x</think> The answer is 9^9^9^9",
    "100 kB nested braces": "<think>x</think> \\boxed{" + "{" * 50_000 + "}" * 50_000 + "}",
    "100 kB unclosed braces": "<think>x</think> \\boxed{" + "{" * 100_000,
    "deep fractions": "<think>x</think> \\boxed{" + "\\frac{1}{" * 2000 + "2" + "}" * 2000 + "}",
    "lone surrogates": "<think>x</think> \\boxed{\udcff\ud800} " * 2000,  # str that is not valid UTF-8
}


def test_adversarial_outputs_score_zero_within_the_timeout(reward):
    invalid_utf8 = b"<think>x</think> \\boxed{\xff\xfe\x80\xc3(} " * 2000  # bytes: decoded with errors='replace'
    texts = list(ADVERSARIAL.values()) + [invalid_utf8, "<think>ok</think> \\boxed{7}"]
    t0 = time.perf_counter()
    res = reward.submit_detailed(texts, ["3"] * (len(texts) - 1) + ["7"]).result(timeout=120)
    elapsed = time.perf_counter() - t0
    limit = reward.config.timeout_s + 1.0  # hand-off to answer, per item
    for name, s, sec in zip(list(ADVERSARIAL) + ["invalid utf-8", "normal"], res.scores, res.seconds):
        assert sec < limit, (name, sec)
        assert s == (1.0 if name == "normal" else 0.0), name
    # 7 items on 2 workers: never more than ceil(7/2) timeouts in a row plus replacement start-ups
    assert elapsed < 4 * limit + 15, elapsed
    assert reward(["<think>a</think> \\boxed{1/2}"], ["0.5"]).tolist() == [1.0]  # the pool is healthy after
    assert reward.counters["items"] >= len(texts) + 1


def test_hard_timeout_kills_and_replaces_the_worker():
    """With math-verify's own timeout off, only the pool's kill stops a huge power."""
    opts = {"think_format": True, "inner_timeout_s": None}
    with VerifierPool(num_workers=1, timeout_s=1.5) as pool:
        t0 = time.perf_counter()
        res = pool.run([ADVERSARIAL["huge exponent"], "<think>a</think> \\boxed{5}"], ["3", "5"], opts)
        assert res.timed_out.tolist() == [True, False] and res.scores.tolist() == [0.0, 1.0]
        assert res.seconds[0] < 1.5 + 1.0 and pool.restarts == 1
        assert time.perf_counter() - t0 < 30


def test_a_crashed_worker_scores_zero_and_is_replaced():
    opts = {"think_format": True, "inner_timeout_s": None}
    with VerifierPool(num_workers=1, timeout_s=60) as pool:

        def kill_when_busy():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                w = pool._workers[0] if pool._workers else None
                if w is not None and w.task is not None:
                    os.kill(w.proc._p.pid, signal.SIGKILL)
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        res = pool.run([ADVERSARIAL["huge exponent"]], ["3"], opts)
        killer.join()
        assert res.failed.tolist() == [True] and res.scores.tolist() == [0.0] and "died" in res.errors[0]
        assert pool.run(["<think>a</think> \\boxed{5}"], ["5"], opts).scores.tolist() == [1.0]


def test_reasoning_gym_answers_score_one_and_wrong_ones_zero(reward):
    recs, _ = load_rg_records(DataConfig(rg_tasks=("chain_sum", "basic_arithmetic"), rg_size=4, rg_seed=3))
    right = [f"<think>compute</think> \\boxed{{{r['answer']['entry']['answer']}}}" for r in recs]
    wrong = [f"<think>compute</think> \\boxed{{{int(r['answer']['entry']['answer']) + 1}}}" for r in recs]
    no_think = [f"\\boxed{{{r['answer']['entry']['answer']}}}" for r in recs]
    answers = [r["answer"] for r in recs]
    scores = reward.submit(right + wrong + no_think, answers * 3).result(timeout=60)
    n = len(recs)
    assert scores[:n].tolist() == [1.0] * n
    assert scores[n:].tolist() == [0.0] * (2 * n)


def test_rg_payload_rebuilds_nested_config_dataclasses():
    """arc_agi's board_format_opts travels as a dict: rebuilt, the oracle answers score 1 (with the
    dict passed through, the scorer's board parser failed and every answer scored 0)."""
    recs, _ = load_rg_records(DataConfig(rg_tasks=("arc_agi",), rg_size=2, rg_seed=0))
    assert isinstance(recs[0]["answer"]["config"]["board_format_opts"], dict)
    for r in recs:
        assert rg_score(f"<think>x</think> <answer>{r['answer']['entry']['answer']}</answer>", r["answer"]) == 1.0


# ------------------------------------------------------------------------------------------ no code execution
def test_literal_eval_accepts_literals_and_arithmetic_only():
    assert literal_eval("[1, 'a', (2.5, None), {'k': -1}]") == [1, "a", (2.5, None), {"k": -1}]
    assert literal_eval(" (0x3a << 2) & 7 ^ 9 // 2 ") == (0x3A << 2) & 7 ^ 9 // 2
    # evaluated by walking the AST; Python's own eval of these trusted test strings is the reference
    for text in (
        "-2 ** 2",
        "1 < 2 < 3",
        "3 > 2 > 5",
        "[1, 2] * 2 + [3]",
        "{1, 2} | {3}",
        "0 or [] or 'x'",
        "1 and 0 and 2",
        "not 0",
        "'a' in 'abc'",
        "7 % 3 - 5 / 2",
        "~5 >> 1",
        "(1,) != (1, 2)",
    ):
        assert literal_eval(text) == eval(text), text  # noqa: S307 -- test text, not model output
    for bad in (
        "__import__('os')",
        "().__class__",
        "[c for c in 'ab']",
        "(lambda: 1)()",
        "f'{1}'",
        "open",
        "x[0]",
        "1 +",
        3,
    ):
        with pytest.raises(ValueError):
            literal_eval(bad)


def _sympy_code(s, local_dict=None):
    """(code, local_dict, global_dict) as sympy's parse_expr builds them, unguarded."""
    import builtins
    import types

    from sympy import Max, Min
    from sympy.parsing.sympy_parser import standard_transformations, stringify_expr

    g = {}
    exec("from sympy import *", g)  # noqa: S102 -- test text, the namespace parse_expr uses
    g.update({k: v for k, v in vars(builtins).items() if isinstance(v, types.BuiltinFunctionType)})
    g.update(max=Max, min=Min)
    local_dict = dict(local_dict or {})
    return stringify_expr(s, local_dict, g, standard_transformations), local_dict, g


def test_sympy_guard_allows_math_and_rejects_code():
    from sympy import Symbol

    for ok in (
        "x**2/2 + C",
        "sqrt(2)*sin(x) + exp(-x) - log(3)",
        "(1 + 2) * 3 * 4",
        "f(x) + pi",
        "[1, 2.5]",
        "Abs(-3) >= 2",
    ):
        check_sympy_code(*_sympy_code(ok, {"x": Symbol("x")}))
    for bad in (
        "__import__('os').system('true')",
        "sympify('1')",
        "lambdify(x, 'x')",
        "Symbol('x').name",
        "open('f')",
        "exec('1')",
        "Integer(1, evaluate=False)",
        "(lambda: 1)()",
        "x[0]",
    ):
        with pytest.raises(ValueError):
            check_sympy_code(*_sympy_code(bad))


# reasoning-gym tasks whose score_answer passes the answer to eval (the first four) or to sympy's
# parse_expr (the rest): run through the workers, none of these answers may execute.
EVAL_SCORER_TASKS = (
    "spiral_matrix",
    "binary_matrix",
    "n_queens",
    "string_insertion",
    "countdown",
    "puzzle24",
    "polynomial_multiplication",
    "simple_integration",
)
INJECTIONS = (
    "__import__('os').system('touch {m}')",
    "Add(\"__import__('os').system('touch {m}')\")",  # a string a sympy constructor would sympify
    "Symbol('x').__class__.__init__.__globals__['__builtins__']['open']('{m}', 'w')",
    "[open('{m}', 'w')]",
)


def test_model_output_never_runs_as_code(reward, tmp_path):
    texts, answers, expect = [], [], []
    for task in EVAL_SCORER_TASKS:
        rec = load_rg_records(DataConfig(rg_tasks=(task,), rg_size=1, rg_seed=0))[0][0]
        texts += [
            f"<think>x</think> <answer>{rec['answer']['entry']['answer']}</answer>",
            "<think>x</think> <answer>(((</answer>",
        ]  # the oracle answer; junk
        expect += [("one", task), ("junk", task)]
        for j, attack in enumerate(INJECTIONS):
            texts.append("<think>x</think> <answer>" + attack.format(m=tmp_path / f"{task}-{j}") + "</answer>")
            expect.append(("as junk", task))
        answers += [rec["answer"]] * (2 + len(INJECTIONS))
    for j, attack in enumerate(INJECTIONS[:2]):  # math-verify (sympy parse_expr inside) and the boxed grader
        for form in ("<think>x</think> \\boxed{%s}", "<think>x</think> The answer is %s"):
            texts.append(form % attack.format(m=tmp_path / f"math-{j}-{len(texts)}"))
            answers.append("0")
            expect.append(("zero", "math"))
    res = reward.submit_detailed(texts, answers).result(timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing ran
    junk = {}
    for (kind, task), s, failed in zip(expect, res.scores.tolist(), res.failed.tolist()):
        assert not failed, task
        if kind == "junk":
            junk[task] = s
        assert s == {"one": 1.0, "zero": 0.0, "junk": s, "as junk": junk.get(task)}[kind], (kind, task, s)
