"""The testbed task: sums of integers solved one addition per step.

Why sums: addition is commutative, so a trace may add the terms in any order. Training
traces use a random order, so sampled traces take different routes (and make different,
mostly independent, mistakes) to the same answer -- the property that makes voting and
search pay off, as in real reasoning models. Difficulty is set by the number of terms
(steps) and their size (digits per step).
"""
from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

THINK_START = "<think>"
THINK_END = "</think>"
STEP_TAG = "<step>"
BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"
ANSWER_PREFIX = "Answer: "
CHECK_PREFIX = "check "


@dataclass(frozen=True)
class Tier:
    """Difficulty knobs of one tier: how many terms, and their range."""

    name: str
    min_terms: int
    max_terms: int
    min_value: int
    max_value: int


# Knobs chosen after training so that the shipped policy's greedy accuracy falls in the
# bands of the model card (easy > 90%, medium 50-90%, hard 10-50%); the training mixture
# covers all of them. Larger operands mean more carries and 4-digit sums: the main lever.
# See ttc_vllm/testbed/README.md.
TIERS: dict[str, Tier] = {
    "easy": Tier("easy", 2, 3, 1, 20),
    "medium": Tier("medium", 5, 6, 100, 999),
    "hard": Tier("hard", 8, 8, 400, 999),
}


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]
    tier: str = "custom"

    @property
    def answer(self) -> int:
        return sum(self.terms)

    @property
    def question(self) -> str:
        return "Q: " + "+".join(str(t) for t in self.terms) + "=?\n"


def tier(name: str) -> Tier:
    try:
        return TIERS[name]
    except KeyError:
        raise ValueError(f"unknown tier {name!r}; choose from {', '.join(TIERS)}") from None


def sample_problem(rng: random.Random, spec: Tier) -> Problem:
    n = rng.randint(spec.min_terms, spec.max_terms)
    return Problem(tuple(rng.randint(spec.min_value, spec.max_value) for _ in range(n)), spec.name)


def generate(tier_name: str, n: int, seed: int) -> list[Problem]:
    """`n` problems of a tier; the same (tier, n, seed) always gives the same list."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    spec = tier(tier_name)
    rng = random.Random(f"{tier_name}:{seed}")
    return [sample_problem(rng, spec) for _ in range(n)]


@dataclass
class Trace:
    """A solution: step lines, optional overthinking ("check") lines, answer."""

    problem: Problem
    steps: list[str]
    checks: list[str] = field(default_factory=list)

    @property
    def thinking(self) -> str:
        lines = self.steps + self.checks
        return "\n" + "".join(f"{line}{STEP_TAG}\n" for line in lines)

    @property
    def completion(self) -> str:
        """Everything the model writes after the prompt."""
        return f"{self.thinking}{THINK_END}\n{ANSWER_PREFIX}{self.problem.answer}{EOS}"


def prompt(problem: Problem) -> str:
    """The raw prompt the model continues (the chat template renders the same text)."""
    return f"{BOS}{problem.question}{THINK_START}"


def few_shot_prompt(question: Problem, examples: list[Problem], rng: random.Random) -> str:
    """A long prompt sharing one prefix: solved `examples` (full traces, no overthinking) in
    the model's own format, then `question`'s prompt. What prefix-sharing measurements use."""
    shots = "".join(f"{prompt(ex)}{solve(ex, rng, overthink_prob=0.0).completion}\n" for ex in examples)
    return shots + prompt(question)


def solve(problem: Problem, rng: random.Random, overthink_prob: float = 0.6,
          max_checks: int | None = None) -> Trace:
    """A correct trace adding the terms in a random order.

    With probability `overthink_prob` the trace keeps "checking" (re-stating earlier steps)
    after the answer is known: the tail that budgets and halting should cut.
    """
    order = list(problem.terms)
    rng.shuffle(order)
    acc = order[0]
    steps = []
    for term in order[1:]:
        steps.append(f"{acc}+{term}={acc + term}")
        acc += term
    checks = []
    if steps and rng.random() < overthink_prob:
        k = rng.randint(1, max_checks or len(steps))
        checks = [CHECK_PREFIX + rng.choice(steps) for _ in range(k)]
    return Trace(problem, steps, checks)


_ANSWER_RE = re.compile(re.escape(ANSWER_PREFIX) + r"(-?\d+)")
# One step line of a testbed trace: "[check ]a+b=c" (groups: check, a, b, c).
STEP_LINE = re.compile(r"^(check )?(-?\d+)\+(-?\d+)=(-?\d+)$")


def extract_answer(text: str) -> int | None:
    """The integer on the answer line after the thinking, or None if there is none."""
    tail = text.split(THINK_END, 1)[1] if THINK_END in text else text
    m = _ANSWER_RE.search(tail)
    return int(m.group(1)) if m else None


def is_correct(problem: Problem, text_or_answer: str | int | None) -> bool:
    answer = extract_answer(text_or_answer) if isinstance(text_or_answer, str) else text_or_answer
    return answer is not None and answer == problem.answer


def thinking_text(completion: str) -> str:
    """The part of a completion inside the thinking block (the prompt opens it)."""
    return completion.split(THINK_END, 1)[0]


def step_lines(completion: str) -> list[str]:
    return [s.strip("\n") for s in thinking_text(completion).split(STEP_TAG) if s.strip("\n")]


def first_answer_offset(problem: Problem, completion: str) -> int | None:
    """Character offset in the thinking text just after the step that first states the
    final answer (None if it never appears): what follows is overthinking."""
    think = thinking_text(completion)
    pos = 0
    for chunk in think.split(STEP_TAG)[:-1]:
        pos += len(chunk) + len(STEP_TAG)
        m = STEP_LINE.match(chunk.strip("\n"))
        if m and int(m.group(4)) == problem.answer:
            return pos
    return None


@dataclass(frozen=True)
class Audit:
    """What a completion's step lines got right (check lines are not audited)."""

    parsed: bool             # every step line reads "A+B=C"
    arithmetic: bool         # every C = A + B
    chained: bool            # every A after the first is the previous C
    terms: bool              # the terms added (first A, every B) are the question's, as a multiset
    reused: int = 0          # term uses beyond the question's copies of a value it has
    foreign: int = 0         # uses of values the question does not have


def audit(problem: Problem, completion: str) -> Audit:
    """Classify a completion's errors: an arithmetic slip, a broken chain, or term
    bookkeeping (a term added twice, so another never; a term the question lacks)."""
    steps = []
    for line in step_lines(completion):
        m = STEP_LINE.match(line)
        if not m:
            return Audit(False, False, False, False)
        if not m.group(1):
            steps.append((int(m.group(2)), int(m.group(3)), int(m.group(4))))
    if not steps:
        return Audit(False, False, False, False)
    used = Counter([steps[0][0]] + [b for _, b, _ in steps])
    extra = used - Counter(problem.terms)
    return Audit(
        parsed=True,
        arithmetic=all(a + b == c for a, b, c in steps),
        chained=all(steps[i][0] == steps[i - 1][2] for i in range(1, len(steps))),
        terms=used == Counter(problem.terms),
        reused=sum(v for k, v in extra.items() if k in problem.terms),
        foreign=sum(v for k, v in extra.items() if k not in problem.terms),
    )


def answer_known_at(token_ids: Sequence[int], think_end: int, step_tag: int, decode,
                    answer: int) -> int | None:
    """Thinking tokens after which a step line first states `answer` (None: never, or not
    before `</think>`): where a halting rule could have stopped a testbed trace for free."""
    start = 0
    for i, t in enumerate(token_ids):
        if t == think_end:
            return None
        if t == step_tag:
            m = STEP_LINE.match(decode(token_ids[start:i]).strip("\n"))
            if m and int(m.group(4)) == answer:
                return i + 1
            start = i + 1
    return None
