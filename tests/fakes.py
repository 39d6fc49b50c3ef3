"""Deterministic test doubles of the policy and the PRM on the testbed task.

FakeArithmeticPolicy writes testbed traces ("\\n12+7=19<step>" ... "\\n</think>\\nAnswer: N"
+ EOS) in the testbed tokenizer's token ids, adding the terms in a seeded random order and
making seeded "carry" mistakes (the result off by +mistake_offset). Because every mistake
shifts the final answer by the same offset, wrong traces tend to agree: a biased policy
where majority voting converges on a wrong answer and a PRM helps.

FakeArithmeticPRM is the testbed's exact checker (ttc_vllm.testbed.oracle_prm.OraclePRM),
which scores like the Monte-Carlo rollout labels of this policy, plus what tests need to
watch it: a per-call delay and a record of the calls.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Sequence

from ttc_vllm.search.protocols import Completion, Step, StepParams, Trace
from ttc_vllm.testbed import task
from ttc_vllm.testbed.oracle_prm import OraclePRM, RunningSum, problem_and_steps
from ttc_vllm.testbed.tokenizer import load_testbed_tokenizer


def prompt_ids(problem: task.Problem) -> list[int]:
    """The token ids of the testbed prompt of a problem."""
    return load_testbed_tokenizer().encode(task.prompt(problem), add_special_tokens=False)


def _seeded_rng(seed: int, prefix: Sequence[int], sample: int) -> random.Random:
    digest = hashlib.sha1(",".join(map(str, prefix)).encode()).hexdigest()[:16]
    return random.Random(f"{seed}:{digest}:{sample}")


class FakeArithmeticPolicy:
    """A StepGenerator over the testbed task. Sample j of a prefix is a pure function of
    (seed, prefix, j), so results do not depend on call order or batching.

    Engine usage is reported like vLLM would: the prompt of each (prefix, n) request on its
    first sample; cached prompt tokens from a model of the prefix cache (the longest prefix
    shared with any sequence generated before, minus the last token which is recomputed).
    `calls` records (kind, prefixes, n) of every call; `delay_s` makes each call sleep, as
    an engine takes time (so concurrent callers queue, e.g. to exercise call merging).
    """

    def __init__(self, seed: int = 0, mistake_rate: float = 0.3, mistake_offset: int = 10,
                 correct_confidence: float = 0.9, wrong_confidence: float = 0.4,
                 delay_s: float = 0.0):
        self.seed = seed
        self.delay_s = delay_s
        self.mistake_rate = mistake_rate
        self.mistake_offset = mistake_offset
        self.correct_confidence = correct_confidence
        self.wrong_confidence = wrong_confidence
        self.calls: list[tuple[str, list[tuple[int, ...]], int]] = []
        self._cache: list[tuple[int, ...]] = []
        tok = load_testbed_tokenizer()
        self.eos_id = tok.eos_token_id

    async def generate_steps(self, prefixes: Sequence[Sequence[int]], n: int,
                             params: StepParams) -> list[list[Step]]:
        await self._called("generate_steps", prefixes, n)

        def draw(prefix, rng, usage):
            step = self._next_step(prefix, rng, params, params.max_tokens)
            return (_with_usage(step, *usage) if usage else step), prefix + step.token_ids

        return self._sample(prefixes, n, draw)

    async def complete(self, prefixes: Sequence[Sequence[int]], n: int,
                       params: StepParams) -> list[list[Completion]]:
        await self._called("complete", prefixes, n)

        def draw(prefix, rng, usage):
            steps, ids, budget = [], prefix, params.max_tokens
            while budget > 0 and not (steps and steps[-1].finished):
                step = self._next_step(ids, rng, params, budget)
                steps.append(step)
                ids += step.token_ids
                budget -= len(step.token_ids)
            if usage:
                steps[0] = _with_usage(steps[0], *usage)
            return tuple(steps), ids

        return self._sample(prefixes, n, draw)

    def _sample(self, prefixes, n, draw) -> list[list]:
        """Sample j of each prefix is draw(prefix, rng_j, usage) -> (sample, its token ids);
        only the first sample of a prefix carries the prefix's usage."""
        out = []
        for prefix in map(tuple, prefixes):
            usage = self._usage(prefix)
            samples = []
            for j in range(n):
                sample, ids = draw(prefix, _seeded_rng(self.seed, prefix, j), usage if j == 0 else None)
                samples.append(sample)
                self._cache.append(ids)
            out.append(samples)
        return out

    async def _called(self, kind: str, prefixes: Sequence[Sequence[int]], n: int) -> None:
        self.calls.append((kind, [tuple(p) for p in prefixes], n))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)

    def _usage(self, prefix: tuple[int, ...]) -> tuple[int, int]:
        shared = max((_common_prefix(prefix, s) for s in self._cache), default=0)
        return len(prefix), min(shared, len(prefix) - 1)

    def _next_step(self, prefix: tuple[int, ...], rng: random.Random, params: StepParams,
                   max_tokens: int) -> Step:
        tok = load_testbed_tokenizer()
        terms, lines, answered = problem_and_steps(tok.decode(prefix))
        if answered:
            raise ValueError("prefix already holds an answer")
        walk = RunningSum(terms)
        for line in lines:
            walk.step(line)
        unused = walk.unused
        if walk.acc is None and len(unused) >= 2:
            a = unused.pop(rng.randrange(len(unused)))
        elif walk.acc is not None and unused:
            a = walk.acc
        else:  # nothing left to add: answer with the running total
            answer = walk.acc if walk.acc is not None else sum(terms)
            text = f"\n{task.THINK_END}\n{task.ANSWER_PREFIX}{answer}"
            ids = tok.encode(text, add_special_tokens=False) + [self.eos_id]
            return self._step(ids, text, walk.on_track, params, max_tokens, finished=True)
        b = unused[rng.randrange(len(unused))]
        mistake = rng.random() < self.mistake_rate
        text = f"\n{a}+{b}={a + b + (self.mistake_offset if mistake else 0)}{task.STEP_TAG}"
        ids = tok.encode(text, add_special_tokens=False)
        return self._step(ids, text, walk.on_track and not mistake, params, max_tokens,
                          finished=False)

    def _step(self, ids: list[int], text: str, correct: bool, params: StepParams,
              max_tokens: int, finished: bool) -> Step:
        if len(ids) > max_tokens:  # cut at the token limit, like an engine's length stop
            ids = ids[:max_tokens]
            text = load_testbed_tokenizer().decode(ids, skip_special_tokens=True)
            finished = False
        confidence = None
        if params.confidence:
            confidence = self.correct_confidence if correct else self.wrong_confidence
        return Step(tuple(ids), text, finished, mean_confidence=confidence)


def _with_usage(step: Step, prompt_tokens: int, cached: int) -> Step:
    return Step(step.token_ids, step.text, step.finished, prompt_tokens=prompt_tokens,
                cached_prompt_tokens=cached, mean_confidence=step.mean_confidence)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class FakeArithmeticPRM(OraclePRM):
    """OraclePRM that tests can watch: `delay_s` makes each call sleep (to exercise batching
    and failures in the PRM pool); `calls` records the number of traces of every call."""

    def __init__(self, step_error: float = 0.3, bad: float = 0.0, delay_s: float = 0.0):
        super().__init__(step_error, bad)
        self.delay_s = delay_s
        self.calls: list[int] = []

    async def score(self, traces: Sequence[Trace]) -> list[list[float]]:
        self.calls.append(len(traces))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return await super().score(traces)


class RecordingGenerator:
    """Wraps a StepGenerator and records every call with its outputs:
    `calls` holds (kind, prefixes, n, outputs)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[str, list[tuple[int, ...]], int, list]] = []

    async def generate_steps(self, prefixes, n, params):
        out = await self.inner.generate_steps(prefixes, n, params)
        self.calls.append(("generate_steps", [tuple(p) for p in prefixes], n, out))
        return out

    async def complete(self, prefixes, n, params):
        out = await self.inner.complete(prefixes, n, params)
        self.calls.append(("complete", [tuple(p) for p in prefixes], n, out))
        return out


class ScriptedGenerator:
    """`complete` returns the given completions (lists of step texts, in testbed token ids;
    the last step of each is finished) for every prefix; n must not exceed their number."""

    def __init__(self, completions: Sequence[Sequence[str]]):
        self.completions = completions

    async def complete(self, prefixes, n, params):
        if n > len(self.completions):
            raise ValueError(f"only {len(self.completions)} scripted completions, n={n}")
        tok = load_testbed_tokenizer()
        traces = [tuple(Step(tok.encode(text, add_special_tokens=False), text,
                             finished=k == len(steps) - 1) for k, text in enumerate(steps))
                  for steps in self.completions[:n]]
        return [list(traces) for _ in prefixes]

    async def generate_steps(self, prefixes, n, params):
        raise NotImplementedError("ScriptedGenerator only completes")


class ScriptedScorer:
    """Scores a trace by looking its completion text up in a table of step-score lists."""

    def __init__(self, table: dict[str, Sequence[float]]):
        self.table = table

    async def score(self, traces: Sequence[Trace]) -> list[list[float]]:
        return [list(self.table[t.text]) for t in traces]


# The problem set of the fake-policy tests, pinned to the knobs the fakes were written for
# (6-8 terms of 50-999) rather than to the testbed tiers, which are tuned to the trained model.
FAKE_HARD_TIER = task.Tier("hard", 6, 8, 50, 999)


def hard_problems(n: int, seed: int) -> list[task.Problem]:
    rng = random.Random(f"hard:{seed}")
    return [task.sample_problem(rng, FAKE_HARD_TIER) for _ in range(n)]
