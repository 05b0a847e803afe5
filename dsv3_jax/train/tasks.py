"""Embedded verifiable tasks for SFT and GRPO: problems generated here, with known answers, so a
run needs no download and its reward (`rewards.exact_answer`) can be checked by hand.

"arithmetic": every a + b and a - b with a, b in 0..99 (2 x 100 x 100 = 20,000 problems). The
prompt is the bare expression and an equals sign, "37+45=" or "37-45=", with no spaces: a
byte-level model reads every character, so short prompts leave the sequence to the answer. The
answer is the decimal result, "82" or "-8" (differences can be negative).

Train/test split: a problem is in "test" when the SHA-256 of its text ("37+45") read as an integer
is 0 modulo 10, so about 10% of the problems. The split depends on the problem alone, not on `n`,
the seed or the order of generation, so no test problem can ever reach training. Within a split,
`seed` draws a permutation and `n` takes its first n problems: a larger n extends a smaller one.
"""

import functools
import hashlib
from collections.abc import Callable

import numpy as np

SPLITS = ("train", "test")
TEST_MODULUS = 10  # 1 problem in TEST_MODULUS (by hash) is held out
OPERATORS = ("+", "-")
OPERAND_RANGE = range(100)


def _is_test(problem: str) -> bool:
    """Held-out membership from the problem's text alone (SHA-256 as an integer, mod 10 == 0)."""
    digest = hashlib.sha256(problem.encode("ascii")).digest()
    return int.from_bytes(digest, "big") % TEST_MODULUS == 0


@functools.lru_cache(maxsize=None)
def _arithmetic_split(split: str) -> tuple[tuple[str, str], ...]:
    """(prompt, answer) of every problem of `split`, in the canonical order (op, a, b)."""
    out = []
    for op in OPERATORS:
        for a in OPERAND_RANGE:
            for b in OPERAND_RANGE:
                problem = f"{a}{op}{b}"
                if _is_test(problem) == (split == "test"):
                    out.append((problem + "=", str(a + b if op == "+" else a - b)))
    return tuple(out)


def arithmetic(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """Records {"prompt": "37+45=", "answer": "82"} of `split` ("train" or "test"), in the order
    of a permutation drawn from `seed`; `n` keeps the first n (default: all of the split)."""
    if split not in SPLITS:
        raise ValueError(f"arithmetic: split must be one of {SPLITS}, got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"arithmetic: seed must be a non-negative integer, got {seed!r}")
    problems = _arithmetic_split(split)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"arithmetic: n must be a positive integer or None, got {n!r}")
        if n > len(problems):
            raise ValueError(f"arithmetic: n={n} but the {split!r} split has only "
                             f"{len(problems)} problems; ask for fewer or use n=None")
    order = np.random.default_rng(int(seed)).permutation(len(problems))
    if n is not None:
        order = order[:n]
    return [{"prompt": problems[i][0], "answer": problems[i][1]} for i in order]


def sft_records(records: list[dict]) -> list[dict]:
    """The same problems as chat records for SFT: the prompt as the user turn, the answer (and
    nothing else, the format `rewards.format_reward` checks) as the assistant turn."""
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"sft_records: record {i} must be a dict, got "
                             f"{type(record).__name__}")
        for field in ("prompt", "answer"):
            if not isinstance(record.get(field), str):
                raise ValueError(f"sft_records: record {i} needs a string {field!r} field, got "
                                 f"{record.get(field)!r}")
        out.append({"messages": [{"role": "user", "content": record["prompt"]},
                                 {"role": "assistant", "content": record["answer"]}]})
    return out


TASKS: dict[str, Callable[..., list[dict]]] = {"arithmetic": arithmetic}


def get_task(name: str) -> Callable[..., list[dict]]:
    """The task generator called `name` (signature: (split, n=None, seed=0) -> records)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
