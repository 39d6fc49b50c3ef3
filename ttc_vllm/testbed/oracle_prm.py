"""The testbed's oracle verifier: an exact checker of the task's rules behind the StepScorer
protocol, for the testbed task only.

`OraclePRM` knows what no learned PRM knows: the problem's terms (read back from the testbed
prompt) and the rule of the task (add them up, one per step, the answer is the sum). It
replays the steps of a trace and scores each one the way a PRM trained on Monte-Carlo
rollout labels would, but exactly: a step that keeps the trace on track (every step so far
added the problem's own terms correctly) scores the chance of finishing without a slip from
there, (1 - step_error) ** additions_left; the right answer scores 1; any step after the
trace went off track, or a wrong answer, scores `bad`. On-track steps always outscore `bad`.

It is deterministic, needs no model and no engine, and does not transfer to any other task:
the server tests and the server benchmarks start with it (`TTC_VLLM_PRM=python:
ttc_vllm.testbed.oracle_prm:OraclePRM`) so that what they measure is the search, not a PRM.
Results that use it must say so; the learned verifier is `ttc_vllm.testbed.prm_scorer_config()`.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

from ttc_vllm.search.protocols import Trace
from ttc_vllm.testbed import task
from ttc_vllm.testbed.tokenizer import load_testbed_tokenizer

_QUESTION_RE = re.compile(r"Q: (-?\d+(?:\+-?\d+)*)=\?")
_ADDITION_RE = re.compile(r"^(-?\d+)\+(-?\d+)=(-?\d+)$")


def problem_and_steps(text: str) -> tuple[tuple[int, ...], list[str], bool]:
    """(terms, step lines, answered?) of a testbed prompt + partial completion."""
    m = _QUESTION_RE.search(text)
    if not m:
        raise ValueError(f"not a testbed prompt: {text[:60]!r}")
    terms = tuple(int(t) for t in m.group(1).split("+"))
    thinking = text[m.end():].split(task.THINK_START, 1)[-1]
    answered = task.THINK_END in thinking
    thinking = thinking.split(task.THINK_END, 1)[0]
    lines = [s.strip("\n") for s in thinking.split(task.STEP_TAG)[:-1]]
    return terms, lines, answered


class RunningSum:
    """Replays step lines over a problem: running total, unused terms, still on track?
    ("check" lines and anything else that is not an addition put the trace off track.)"""

    def __init__(self, terms: Sequence[int]):
        self.remaining = Counter(terms)
        self.acc: int | None = None
        self.on_track = True  # every step so far used the problem's terms and added right

    def _take(self, term: int) -> bool:
        if self.remaining[term] <= 0:
            return False
        self.remaining[term] -= 1
        return True

    def step(self, line: str) -> None:
        m = _ADDITION_RE.match(line)
        if not m:
            self.on_track = False
            return
        a, b, c = (int(g) for g in m.groups())
        if self.acc is None:
            ok = self._take(a) and self._take(b)
        else:
            ok = a == self.acc and self._take(b)
        self.on_track = self.on_track and ok and c == a + b
        self.acc = c

    @property
    def unused(self) -> list[int]:
        return sorted(self.remaining.elements())


class OraclePRM:
    """A StepScorer that checks testbed traces exactly (see the module docstring)."""

    def __init__(self, step_error: float = 0.3, bad: float = 0.0):
        self.step_error = step_error
        self.bad = bad

    async def score(self, traces: Sequence[Trace]) -> list[list[float]]:
        return [self.score_trace(t) for t in traces]

    def score_trace(self, trace: Trace) -> list[float]:
        tok = load_testbed_tokenizer()
        terms, _, _ = problem_and_steps(tok.decode(trace.prompt_ids))
        walk = RunningSum(terms)
        scores = []
        for step in trace.steps:
            line = step.text.strip("\n")
            if step.finished or task.THINK_END in line:
                right = walk.on_track and task.extract_answer(step.text) == sum(terms)
                scores.append(1.0 if right else self.bad)
                continue
            walk.step(line.removesuffix(task.STEP_TAG))
            if walk.on_track:
                scores.append((1.0 - self.step_error) ** max(len(walk.unused), 0))
            else:
                scores.append(self.bad)
        return scores
