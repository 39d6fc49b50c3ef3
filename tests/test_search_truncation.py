import asyncio
import math

import pytest

from tests import fakes
from ttc_vllm.search import SearchOptions, Step, Trace, run_search
from tests.fakes import FakeArithmeticPolicy, FakeArithmeticPRM, RecordingGenerator, prompt_ids
from ttc_vllm.testbed import task

HARD = fakes.hard_problems(10, seed=1)


def _run(strategy, problem, generator, scorer=None, **options):
    opts = SearchOptions(strategy=strategy, **options)
    return asyncio.run(run_search(prompt_ids(problem), generator, scorer, opts, task.extract_answer))


def _after_two_steps(gen):
    """(prefix ids, step list) of each trace after the two step-wise rounds."""
    (_, [root], _, [first]), (_, prefixes, _, second) = gen.calls[:2]
    assert prefixes == [root + s.token_ids for s in first]
    return [(p + s2.token_ids, (s1, s2)) for p, s1, [s2] in zip(prefixes, first, second)]


def test_confidence_truncation_keeps_the_most_confident_share():
    for i, problem in enumerate(HARD[:5]):
        gen = RecordingGenerator(FakeArithmeticPolicy(seed=i))
        result = _run("majority", problem, gen, n=8,
                      truncate={"after_steps": 2, "keep_ratio": 0.5, "by": "confidence"})
        assert [kind for kind, *_ in gen.calls] == ["generate_steps", "generate_steps", "complete"]
        traces = _after_two_steps(gen)
        kept = gen.calls[2][1]
        assert len(kept) == math.ceil(0.5 * 8)
        conf = {ids: min(s.mean_confidence for s in steps) for ids, steps in traces}
        dropped = [ids for ids, _ in traces if ids not in kept]
        assert min(conf[k] for k in kept) >= max(conf[d] for d in dropped)
        assert len(result.candidates) == 4
        assert result.accounting.halted == 4


def test_truncation_saves_tokens():
    for i, problem in enumerate(HARD[:5]):
        full = _run("majority", problem, FakeArithmeticPolicy(seed=i), n=8)
        cut = _run("majority", problem, FakeArithmeticPolicy(seed=i), n=8,
                   truncate={"after_steps": 2, "keep_ratio": 0.25, "by": "confidence"})
        assert cut.accounting.generated_tokens < full.accounting.generated_tokens


def test_ties_keep_the_earlier_samples():
    policy = FakeArithmeticPolicy(seed=3, correct_confidence=0.7, wrong_confidence=0.7)
    gen = RecordingGenerator(policy)
    _run("majority", HARD[0], gen, n=8, truncate={"after_steps": 2, "keep_ratio": 0.5, "by": "confidence"})
    traces = _after_two_steps(gen)
    assert gen.calls[2][1] == [ids for ids, _ in traces[:4]]


def test_prm_truncation_keeps_the_best_scored_and_votes_among_survivors():
    prm = FakeArithmeticPRM()
    for i, problem in enumerate(HARD[:5]):
        gen = RecordingGenerator(FakeArithmeticPolicy(seed=i))
        result = _run("weighted_vote", problem, gen, FakeArithmeticPRM(), n=8,
                      truncate={"after_steps": 2, "keep_ratio": 0.25, "by": "prm"})
        prompt = tuple(prompt_ids(problem))
        traces = _after_two_steps(gen)
        score = {ids: min(prm.score_trace(Trace(prompt, steps))) for ids, steps in traces}
        kept = gen.calls[2][1]
        assert len(kept) == 2
        assert min(score[k] for k in kept) >= max(score[ids] for ids, _ in traces if ids not in kept)
        acc = result.accounting
        assert acc.prm_calls == 2 and acc.prm_traces == 8 + 2  # ranking, then the final vote


class _NoConfidence:
    def __init__(self, inner):
        self.inner = inner

    async def generate_steps(self, prefixes, n, params):
        out = await self.inner.generate_steps(prefixes, n, params)
        return [[Step(s.token_ids, s.text, s.finished) for s in samples] for samples in out]


def test_confidence_truncation_needs_confidence_from_the_generator():
    with pytest.raises(RuntimeError, match="mean_confidence"):
        _run("majority", HARD[0], _NoConfidence(FakeArithmeticPolicy()), n=4,
             truncate={"by": "confidence"})
