"""Reward functions for GRPO: loading them from flags, calling them, combining their scores.

The calling convention is TRL's (`trl/trainer/grpo_trainer.py`, summarised in
training_systems.md §3.4): a reward function is called with keyword arguments `prompts` and
`completions` (one entry per sampled completion, so a prompt sampled G times appears G times)
plus every other field of the prompt records (the data set's columns, each a list aligned with
the completions), and returns one number per completion, or None where it does not apply (this
lets several task-specific rewards share one batch). Functions should accept `**kwargs` so that
unknown columns pass through.

Combination, as in TRL: total = sum over functions of weight * reward, skipping None. Unlike TRL
(which warns and leaves NaN in the total when every function returned None for a row) we refuse
such a row: a NaN reward would turn every advantage of its group into NaN.

Values we accept from a reward function: Python int/float and numpy integer/floating scalars,
finite, or None. We reject bool (and numpy bool): a function that returns a comparison instead of
a score is more often a bug than a choice; `float(ok)` says it explicitly. NaN is also rejected:
None is the one way to say "not applicable".

Built-ins: `exact_answer` (final-answer match, with the parse rule of `parse_answer`) and
`format` (the completion is one number and nothing else: our arithmetic task's format, see
`tasks.py`).
"""

import dataclasses
import hashlib
import importlib.util
import itertools
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

import numpy as np


class RewardError(ValueError):
    """A reward function that cannot be loaded, fails, or returns something we cannot use."""


@dataclasses.dataclass(frozen=True)
class RewardFn:
    """One reward: the name its scores are logged under, the function, and its weight."""
    name: str
    fn: Callable
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise RewardError(f"RewardFn name must be a non-empty string, got {self.name!r}")
        if not callable(self.fn):
            raise RewardError(f"reward {self.name!r}: fn is not callable ({type(self.fn)!r})")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float, np.number)):
            raise RewardError(f"reward {self.name!r}: weight must be a number, "
                              f"got {self.weight!r}")
        if not math.isfinite(float(self.weight)):
            raise RewardError(f"reward {self.name!r}: weight must be finite, got {self.weight!r}")


# ----------------------------------------------------------------------------- answer parsing

# A number: optional sign (only where it cannot be a binary minus, i.e. not right after a letter,
# digit or dot), digits with optional thousands commas, optional decimal part. "5-3" holds the
# numbers 5 and 3; "x=-3" holds -3; "1,234.5" is 1234.5; "3." at a sentence end is 3.
_NUMBER = r"(?:(?<![\w.])[-+])?(?<![\d.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_FULL_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_BOXED = "\\boxed{"


def _last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (braces balanced, so `\\boxed{\\frac{1}{2}}`
    works); None when there is none. An unclosed one (a truncated completion) does not count."""
    start = text.rfind(_BOXED)
    while start != -1:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(_BOXED):i - 1]
        start = text.rfind(_BOXED, 0, start)
    return None


def parse_answer(text: str) -> str | None:
    """The final answer of a completion, or None when it gives none.

    Rule, first that applies: the content of the last complete `\\boxed{...}` (the convention of
    math-reasoning models), else the text after the last "####" (GSM8K's answer marker), else the
    last number in the text (thousands commas removed: "1,234" -> "1234"). Whitespace is stripped;
    an empty boxed or "####" answer counts as no answer (None), with no fallback to later rules,
    because the completion did declare its final answer.
    """
    if not isinstance(text, str):
        raise RewardError(f"parse_answer: text must be a string, got {type(text).__name__}")
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    if "####" in text:
        return text.rpartition("####")[2].strip() or None
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _as_number(text: str) -> float | None:
    """`text` as a number when it is exactly one (sign, thousands commas, decimals), else None."""
    text = text.strip()
    if not _FULL_NUMBER_RE.fullmatch(text):
        return None
    return float(text.replace(",", ""))


def _answers_match(predicted: str, reference: str) -> bool:
    """Numbers compare numerically (|p - r| <= 1e-6 * max(1, |r|)); anything else compares as
    whitespace-stripped strings."""
    p, r = _as_number(predicted), _as_number(reference)
    if p is not None and r is not None:
        return abs(p - r) <= 1e-6 * max(1.0, abs(r))
    return predicted.strip() == reference.strip()


# ----------------------------------------------------------------------------- built-ins


def exact_answer(prompts: list[str], completions: list[str], answer: list | None = None,
                 **_) -> list[float | None]:
    """1.0 where the completion's final answer (`parse_answer`) equals the `answer` column, else
    0.0; None where that row's answer is None (the row belongs to a task this reward does not
    judge). Answers that are not strings (ints from a JSON file) are compared via `str`."""
    if answer is None:
        raise RewardError('exact_answer needs an "answer" field in the data (each record: '
                          '{"prompt": ..., "answer": ...})')
    if len(answer) != len(completions):
        raise RewardError(f"exact_answer: {len(answer)} answers for {len(completions)} "
                          "completions")
    scores = []
    for completion, reference in zip(completions, answer):
        if reference is None:
            scores.append(None)
            continue
        predicted = parse_answer(completion)
        scores.append(float(predicted is not None and _answers_match(predicted, str(reference))))
    return scores


def format_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 where the stripped completion is exactly one number (the arithmetic task's format: the
    answer and nothing else), else 0.0."""
    return [float(_FULL_NUMBER_RE.fullmatch(c.strip()) is not None) for c in completions]


BUILTINS: dict[str, Callable] = {"exact_answer": exact_answer, "format": format_reward}


# ----------------------------------------------------------------------------- loading

_module_ids = itertools.count()


def _load_from_file(spec: str, path: str, fn_name: str) -> Callable:
    """Import `path` as a fresh module (its own name, so two files with the same stem do not
    clash) and return its attribute `fn_name`."""
    if not path or not fn_name:
        raise RewardError(f"--reward {spec!r}: expected path/to/file.py:function")
    if not os.path.isfile(path):
        raise RewardError(f"--reward {spec!r}: no such file {path!r}")
    digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
    module_name = f"_dsv3_reward_{digest}_{next(_module_ids)}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"--reward {spec!r}: {path!r} is not a Python source file (.py)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise RewardError(f"--reward {spec!r}: importing {path!r} raised "
                          f"{type(e).__name__}: {e}") from e
    if not hasattr(module, fn_name):
        raise RewardError(f"--reward {spec!r}: {path!r} has no function {fn_name!r}")
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise RewardError(f"--reward {spec!r}: {fn_name!r} in {path!r} is not callable "
                          f"({type(fn).__name__})")
    return fn


def load_reward(spec: str) -> Callable:
    """A reward function from a flag value: a built-in name (see `BUILTINS`) or
    `path/to/file.py:function`."""
    if not isinstance(spec, str) or not spec:
        raise RewardError(f"--reward: expected a built-in name or path.py:function, got {spec!r}")
    if spec in BUILTINS:
        return BUILTINS[spec]
    if ":" not in spec:
        raise RewardError(f"--reward {spec!r}: not a built-in ({', '.join(sorted(BUILTINS))}) "
                          "and not of the form path/to/file.py:function")
    path, _, fn_name = spec.rpartition(":")
    return _load_from_file(spec, path, fn_name)


def _reward_name(spec: str) -> str:
    """Log name: the built-in's name, or the function's name for a file spec."""
    return spec if spec in BUILTINS else spec.rpartition(":")[2]


def build_rewards(specs: Sequence[str], weights: Sequence[float] | None = None) -> list[RewardFn]:
    """The rewards of a run from its `--reward` flags (repeatable) and `--reward_weights` (one
    per reward; default 1.0 each). Names must be distinct, since scores are logged by name."""
    specs = list(specs)
    if not specs:
        raise RewardError("--reward: no reward functions given; name at least one (e.g. "
                          "--reward exact_answer)")
    if weights is None:
        weights = [1.0] * len(specs)
    weights = list(weights)
    if len(weights) != len(specs):
        raise RewardError(f"--reward_weights has {len(weights)} values for {len(specs)} --reward "
                          "functions; give one weight per --reward, or none for 1.0 each")
    rewards, seen = [], {}
    for spec, weight in zip(specs, weights):
        name = _reward_name(spec)
        if name in seen:
            raise RewardError(f"--reward {spec!r}: name {name!r} already used by --reward "
                              f"{seen[name]!r}; rewards are logged by name, so rename one")
        seen[name] = spec
        rewards.append(RewardFn(name, load_reward(spec), weight))
    return rewards


# ----------------------------------------------------------------------------- scoring


def _check_value(name: str, index: int, value) -> float:
    """One returned entry as a float (NaN for None), or RewardError naming function and index."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise RewardError(f"reward function {name!r} returned {value!r} "
                          f"({type(value).__name__}) at index {index}; expected a real number "
                          "or None (bools are refused: return 1.0/0.0)")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise RewardError(f"reward function {name!r} returned {value!r} at index {index}; "
                          "rewards must be finite (return None for 'not applicable')")
    return result


def _call(reward: RewardFn, prompts: list, completions: list, columns: dict) -> np.ndarray:
    """Scores of one function as float64 [N], NaN where it returned None."""
    try:
        out = reward.fn(prompts=prompts, completions=completions, **columns)
    except Exception as e:
        raise RewardError(f"reward function {reward.name!r} raised {type(e).__name__}: {e}") \
            from e
    if isinstance(out, np.ndarray):
        if out.ndim != 1:
            raise RewardError(f"reward function {reward.name!r} returned an array of shape "
                              f"{out.shape}; expected a list of {len(completions)} numbers")
        out = out.tolist() if out.dtype != object else list(out)
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward function {reward.name!r} returned {type(out).__name__}; "
                          f"expected a list of {len(completions)} numbers (or None)")
    if len(out) != len(completions):
        raise RewardError(f"reward function {reward.name!r} returned {len(out)} values for "
                          f"{len(completions)} completions")
    return np.array([_check_value(reward.name, i, v) for i, v in enumerate(out)], np.float64)


def score(rewards: Sequence[RewardFn], prompts: Sequence[str], completions: Sequence[str],
          columns: dict[str, Sequence] | None = None
          ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Call every reward on a batch and combine: (total float32 [N], {name: float32 [N]}).

    `columns` are the records' other fields, each aligned with the completions. The total is the
    weighted sum over functions, None entries skipped; per-function arrays keep NaN there. A row
    where every function returned None is an error (no reward means no advantage).
    """
    prompts, completions = list(prompts), list(completions)
    columns = {} if columns is None else dict(columns)
    n = len(completions)
    if not rewards:
        raise RewardError("score: no reward functions")
    if len(prompts) != n:
        raise RewardError(f"score: {len(prompts)} prompts for {n} completions; repeat each "
                          "prompt once per completion")
    for key, values in columns.items():
        if key in ("prompts", "completions"):
            raise RewardError(f"score: data column {key!r} clashes with the reward argument of "
                              "the same name; rename the field")
        if len(values) != n:
            raise RewardError(f"score: column {key!r} has {len(values)} values for {n} "
                              "completions")
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise RewardError(f"score: reward names must be distinct, got {names}")
    per_fn = {r.name: _call(r, prompts, completions, columns) for r in rewards}
    stacked = np.stack([per_fn[r.name] * float(r.weight) for r in rewards]) if n else \
        np.zeros((len(rewards), 0))
    missing = np.all(np.isnan(stacked), axis=0)
    if missing.any():
        rows = np.flatnonzero(missing).tolist()
        raise RewardError(f"score: every reward function returned None for row(s) {rows[:10]}"
                          f"{' ...' if len(rows) > 10 else ''}; each completion needs at least "
                          f"one applicable reward (functions: {names})")
    total = np.nansum(stacked, axis=0).astype(np.float32)
    return total, {k: v.astype(np.float32) for k, v in per_fn.items()}
