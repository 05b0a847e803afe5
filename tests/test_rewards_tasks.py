"""GRPO rewards (loading, TRL's calling convention, validation, weighting, the built-ins) and the
embedded arithmetic task (determinism, held-out split, answers, SFT records)."""

import hashlib
import math
import textwrap

import numpy as np
import pytest

from dsv3_jax.train import rewards as R
from dsv3_jax.train import tasks as T
from dsv3_jax.train.rewards import RewardError, RewardFn


def _write(tmp_path, source: str, name: str = "my_rewards.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def _fn(name, fn, weight=1.0):
    return RewardFn(name, fn, weight)


PROMPTS = ["1+1=", "1+1=", "2-5=", "2-5="]
COMPLETIONS = ["2", "3", "-3", "x"]
ANSWERS = ["2", "2", "-3", "-3"]

# ----------------------------------------------------------------------------- loading


def test_load_builtins_by_name():
    assert R.load_reward("exact_answer") is R.exact_answer
    assert R.load_reward("format") is R.format_reward


def test_load_from_file_and_columns_pass_through(tmp_path):
    path = _write(tmp_path, """
        def length_match(prompts, completions, answer, **kwargs):
            return [float(len(c) == len(a)) for c, a in zip(completions, answer)]
        """)
    fn = R.load_reward(f"{path}:length_match")
    total, per = R.score([_fn("length_match", fn)], PROMPTS, COMPLETIONS, {"answer": ANSWERS})
    np.testing.assert_array_equal(total, [1, 1, 1, 0])
    assert total.dtype == np.float32 and per["length_match"].dtype == np.float32


def test_columns_and_keywords_reach_the_function():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions, **kwargs)
        return [0.0] * len(completions)

    R.score([_fn("spy", spy)], PROMPTS, COMPLETIONS, {"answer": ANSWERS, "task": ["a"] * 4})
    assert seen == {"prompts": PROMPTS, "completions": COMPLETIONS, "answer": ANSWERS,
                    "task": ["a"] * 4}


def test_two_files_with_same_stem_do_not_clash(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    p1 = _write(tmp_path / "a", "def r(prompts, completions, **k): return [1.0] * len(prompts)")
    p2 = _write(tmp_path / "b", "def r(prompts, completions, **k): return [2.0] * len(prompts)")
    f1, f2 = R.load_reward(f"{p1}:r"), R.load_reward(f"{p2}:r")
    assert f1(["p"], ["c"]) == [1.0] and f2(["p"], ["c"]) == [2.0]


def test_load_errors(tmp_path):
    with pytest.raises(RewardError, match="no such file"):
        R.load_reward(f"{tmp_path}/missing.py:f")
    path = _write(tmp_path, "x = 3\n")
    with pytest.raises(RewardError, match="no function 'nope'"):
        R.load_reward(f"{path}:nope")
    with pytest.raises(RewardError, match="'x'.*not callable"):
        R.load_reward(f"{path}:x")
    bad = _write(tmp_path, "raise RuntimeError('boom at import')\n", "bad.py")
    with pytest.raises(RewardError, match="boom at import") as info:
        R.load_reward(f"{bad}:f")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "bad.py:f" in str(info.value)
    with pytest.raises(RewardError, match="not a built-in"):
        R.load_reward("exact")
    with pytest.raises(RewardError, match="path/to/file.py:function"):
        R.load_reward(f"{path}:")


def test_build_rewards_weights_and_names(tmp_path):
    path = _write(tmp_path, "def mine(prompts, completions, **k): return [0.5] * len(prompts)")
    built = R.build_rewards(["exact_answer", f"{path}:mine"])
    assert [(r.name, r.weight) for r in built] == [("exact_answer", 1.0), ("mine", 1.0)]
    built = R.build_rewards(["format", "exact_answer"], [0.25, 2.0])
    assert [(r.name, r.fn, r.weight) for r in built] == [
        ("format", R.format_reward, 0.25), ("exact_answer", R.exact_answer, 2.0)]
    with pytest.raises(RewardError, match="--reward_weights.*2 values for 1 --reward"):
        R.build_rewards(["format"], [1.0, 2.0])
    with pytest.raises(RewardError, match="already used"):
        R.build_rewards(["format", "format"])
    with pytest.raises(RewardError, match="no reward functions"):
        R.build_rewards([])
    with pytest.raises(RewardError, match="finite"):
        R.build_rewards(["format"], [math.inf])


# ----------------------------------------------------------------------------- score


def test_none_handling_and_weighting_hand_computed():
    def a(prompts, completions, **_):
        return [1.0, None, 0.5, 2]

    def b(prompts, completions, **_):
        return np.array([0.25, -1.0, None, 3.0], dtype=object)

    total, per = R.score([_fn("a", a, 2.0), _fn("b", b, -0.5)], PROMPTS, COMPLETIONS)
    # by hand: row0 2*1 - .5*.25; row1 only b: -.5*-1; row2 only a: 2*.5; row3 2*2 - .5*3
    np.testing.assert_allclose(total, [1.875, 0.5, 1.0, 2.5], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(per["a"], np.array([1.0, np.nan, 0.5, 2.0], np.float32))
    np.testing.assert_array_equal(per["b"], np.array([0.25, -1.0, np.nan, 3.0], np.float32))
    assert list(per) == ["a", "b"]


def test_numpy_results_and_scalars_accepted():
    def f(prompts, completions, **_):
        return np.array([1, 2, 3, 4], np.int64)

    def g(prompts, completions, **_):
        return (np.float32(0.5), np.int8(1), 0, 1.5)

    total, _ = R.score([_fn("f", f), _fn("g", g, 2.0)], PROMPTS, COMPLETIONS)
    np.testing.assert_array_equal(total, [2.0, 4.0, 3.0, 7.0])


def _score_one(fn, name="culprit"):
    return R.score([_fn(name, fn)], PROMPTS, COMPLETIONS)


def test_function_that_raises_is_named_and_chained():
    def boom(prompts, completions, **_):
        raise KeyError("gold")

    with pytest.raises(RewardError, match="'culprit' raised KeyError") as info:
        _score_one(boom)
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize("out, pattern", [
    ([1.0, 2.0], "'culprit' returned 2 values for 4 completions"),
    (np.zeros((4, 1)), "'culprit' returned an array of shape"),
    (3.0, "'culprit' returned float"),
    ([1.0, "1.0", 0.0, 0.0], "'culprit' returned '1.0' .str. at index 1"),
    ([1.0, 0.0, True, 0.0], "'culprit' returned True .bool. at index 2"),
    ([1.0, 0.0, 0.0, float("nan")], "'culprit' returned nan at index 3"),
    ([math.inf, 0.0, 0.0, 0.0], "'culprit' returned inf at index 0"),
    ([1.0, 0.0, 1j, 0.0], "'culprit' returned 1j .complex. at index 2"),
    (np.array([True, False, True, True]), "'culprit' returned True .bool. at index 0"),
])
def test_bad_results_are_named(out, pattern):
    with pytest.raises(RewardError, match=pattern):
        _score_one(lambda prompts, completions, **_: out)


def test_all_none_row_is_refused():
    def a(prompts, completions, **_):
        return [1.0, None, 1.0, None]

    def b(prompts, completions, **_):
        return [None, None, 1.0, 0.0]

    with pytest.raises(RewardError, match=r"row\(s\) \[1\]"):
        R.score([_fn("a", a), _fn("b", b)], PROMPTS, COMPLETIONS)


def test_score_input_checks():
    ok = _fn("ok", lambda prompts, completions, **_: [0.0] * len(completions))
    with pytest.raises(RewardError, match="3 prompts for 4 completions"):
        R.score([ok], PROMPTS[:3], COMPLETIONS)
    with pytest.raises(RewardError, match="column 'answer' has 2 values"):
        R.score([ok], PROMPTS, COMPLETIONS, {"answer": ["1", "2"]})
    with pytest.raises(RewardError, match="clashes"):
        R.score([ok], PROMPTS, COMPLETIONS, {"completions": COMPLETIONS})
    with pytest.raises(RewardError, match="distinct"):
        R.score([ok, ok], PROMPTS, COMPLETIONS)


# ----------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}. Later 7", "42"),
    ("\\boxed{1} then \\boxed{ \\frac{1}{2} }", "\\frac{1}{2}"),
    ("\\boxed{5} and a truncated \\boxed{6", "5"),
    ("\\boxed{}", None),
    ("Natalia sold 48 clips.\n#### 72", "72"),
    ("#### 1 and #### 2,000 ", "2,000"),
    ("first 3 then 17.5 then 12", "12"),
    ("x = -8", "-8"),
    ("37-45=-8", "-8"),
    ("5-3", "3"),
    ("it costs 1,234,567 dollars", "1234567"),
    ("about 3.25.", "3.25"),
    ("The answer is 3.", "3"),
    ("+7", "+7"),
    ("no digits here", None),
    ("", None),
])
def test_parse_answer(text, expected):
    assert R.parse_answer(text) == expected


def test_exact_answer_examples():
    completions = ["82", "the answer is 82.", "\\boxed{82.0000000001}", "81", "-8", "-8.0",
                   "####  1,000", "#### 1000 apples", "\\boxed{x+1}", "", "7"]
    answers = ["82", "82", "82", "82", "-8", "-8", "1000", "1000", "x + 1", "0", None]
    got = R.exact_answer([""] * len(answers), completions, answer=answers)
    assert got == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, None]
    assert R.exact_answer(["p"], ["\\boxed{x+1}"], answer=["x+1"]) == [1.0]
    assert R.exact_answer(["p", "p"], ["12", "12"], answer=[12, 13]) == [1.0, 0.0]


def test_exact_answer_needs_answer_column():
    with pytest.raises(RewardError, match='"answer" field'):
        R.exact_answer(["p"], ["1"])
    rewards = R.build_rewards(["exact_answer"])
    with pytest.raises(RewardError, match="'exact_answer' raised.*\"answer\" field"):
        R.score(rewards, PROMPTS, COMPLETIONS)


def test_format_reward_examples():
    completions = ["42", " -8\n", "3.5", "1,000", "42.", "42 ", "the answer is 42", "4 2", "",
                   "\\boxed{4}", "--4"]
    assert R.format_reward([""] * len(completions), completions) == [
        1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_builtins_through_score_with_weights():
    rewards = R.build_rewards(["exact_answer", "format"], [1.0, 0.5])
    total, per = R.score(rewards, PROMPTS, ["2", "=2", "-3", "x"], {"answer": ANSWERS})
    np.testing.assert_array_equal(per["exact_answer"], [1, 1, 1, 0])
    np.testing.assert_array_equal(per["format"], [1, 0, 1, 0])
    np.testing.assert_array_equal(total, [1.5, 1.0, 1.5, 0.0])


# ----------------------------------------------------------------------------- tasks


def _evaluate(prompt: str) -> int:
    """Independent check of an arithmetic prompt "a+b=" / "a-b=" (parsed by hand, no eval)."""
    assert prompt.endswith("=")
    body = prompt[:-1]
    op = "+" if "+" in body else "-"
    a, b = body.split(op)
    assert a.isdigit() and b.isdigit() and 0 <= int(a) <= 99 and 0 <= int(b) <= 99
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def test_arithmetic_split_disjoint_complete_and_correct():
    train, test = T.arithmetic("train"), T.arithmetic("test")
    train_p, test_p = {r["prompt"] for r in train}, {r["prompt"] for r in test}
    assert len(train_p) == len(train) and len(test_p) == len(test)  # no duplicates
    assert not train_p & test_p
    everything = {f"{a}{op}{b}=" for op in "+-" for a in range(100) for b in range(100)}
    assert train_p | test_p == everything and len(everything) == 20_000
    assert 0.08 <= len(test) / 20_000 <= 0.12
    assert (len(train), len(test)) == (17_989, 2_011)  # pins the split rule
    for r in train + test:
        assert set(r) == {"prompt", "answer"} and r["answer"] == str(_evaluate(r["prompt"]))
    assert any(r["answer"].startswith("-") for r in test)
    # the documented rule, re-derived: held out iff sha256("a op b") = 0 mod 10
    for p in test_p:
        assert int(hashlib.sha256(p[:-1].encode()).hexdigest(), 16) % 10 == 0


def test_arithmetic_deterministic_n_and_seed():
    assert T.arithmetic("train", seed=3) == T.arithmetic("train", seed=3)
    full = T.arithmetic("test", seed=5)
    assert T.arithmetic("test", n=50, seed=5) == full[:50]  # n takes a prefix
    other = T.arithmetic("test", n=50, seed=6)
    assert other != full[:50]
    assert {r["prompt"] for r in other} <= {r["prompt"] for r in full}  # same split
    assert len(T.arithmetic("train", n=1)) == 1
    assert T.arithmetic("test", n=2011, seed=1)  # exactly the split size is fine
    with pytest.raises(ValueError, match="n=2012.*only 2011"):
        T.arithmetic("test", n=2012)
    with pytest.raises(ValueError, match="split must be one of"):
        T.arithmetic("validation")
    with pytest.raises(ValueError, match="n must be"):
        T.arithmetic("train", n=0)
    with pytest.raises(ValueError, match="seed must be"):
        T.arithmetic("train", seed=-1)


def test_arithmetic_records_score_with_builtins():
    records = T.arithmetic("test", n=6, seed=0)
    prompts = [r["prompt"] for r in records]
    answers = [r["answer"] for r in records]
    completions = answers[:3] + [str(int(a) + 1) for a in answers[3:]]
    total, _ = R.score(R.build_rewards(["exact_answer", "format"]), prompts, completions,
                       {"answer": answers})
    np.testing.assert_array_equal(total, [2, 2, 2, 1, 1, 1])


def test_sft_records_and_get_task():
    records = T.arithmetic("train", n=3)
    sft = T.sft_records(records)
    assert sft == [{"messages": [{"role": "user", "content": r["prompt"]},
                                 {"role": "assistant", "content": r["answer"]}]}
                   for r in records]
    with pytest.raises(ValueError, match="record 1 needs a string 'answer'"):
        T.sft_records([{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+2="}])
    assert T.get_task("arithmetic") is T.arithmetic
    with pytest.raises(ValueError, match="known tasks: arithmetic"):
        T.get_task("gsm8k")
