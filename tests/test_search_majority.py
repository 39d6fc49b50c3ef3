import asyncio
from collections import Counter

import pytest

from tests import fakes
from ttc_vllm.search import SearchOptions, run_search
from tests.fakes import FakeArithmeticPolicy, FakeArithmeticPRM, prompt_ids
from ttc_vllm.testbed import task

HARD = fakes.hard_problems(10, seed=1)


def _run(problem, policy, scorer=None, **options):
    opts = SearchOptions(strategy="majority", **options)
    return asyncio.run(run_search(prompt_ids(problem), policy, scorer, opts, task.extract_answer))


def test_answer_is_the_mode_with_first_seen_tie_break():
    for i, problem in enumerate(HARD):
        result = _run(problem, FakeArithmeticPolicy(seed=i), n=8)
        answers = [c.answer for c in result.candidates]
        counts = Counter(a for a in answers if a is not None)
        top = max(counts.values())
        expected = next(a for a in answers if a is not None and counts[a] == top)
        assert result.answer == expected
        assert result.chosen is result.candidates[answers.index(expected)]


def test_biased_policy_fools_majority():
    # The fake policy's mistakes all shift the sum by +10, so wrong traces agree.
    correct = sum(_run(p, FakeArithmeticPolicy(seed=i), n=8).answer == str(p.answer)
                  for i, p in enumerate(HARD))
    assert correct <= 3


def test_accounting_counts_exactly():
    problem = HARD[0]
    prompt = prompt_ids(problem)
    result = _run(problem, FakeArithmeticPolicy(seed=0), n=6)
    acc = result.accounting
    assert len(result.candidates) == 6 and all(c.finished for c in result.candidates)
    assert acc.generated_tokens == sum(len(c.trace.token_ids) - len(prompt) for c in result.candidates)
    assert acc.prompt_tokens == len(prompt)  # six samples, one engine request
    assert acc.cached_prompt_tokens == 0
    assert (acc.generator_calls, acc.nodes_expanded) == (1, 1)
    assert (acc.prm_calls, acc.prm_traces, acc.prm_tokens) == (0, 0, 0)
    assert acc.halted == 0
    assert acc.wall_time_s > 0


def test_traces_cut_at_the_token_limit_are_halted():
    result = _run(HARD[0], FakeArithmeticPolicy(seed=0), n=4, max_steps=2, max_step_tokens=8)
    assert result.answer is None
    assert not any(c.finished for c in result.candidates)
    assert all(len(c.trace.token_ids) - len(prompt_ids(HARD[0])) <= 16 for c in result.candidates)
    assert result.accounting.halted == 4


def test_majority_needs_no_scorer_but_prm_strategies_do():
    assert _run(HARD[0], FakeArithmeticPolicy(), n=2).answer is not None
    opts = SearchOptions(strategy="weighted_vote", n=2)
    with pytest.raises(ValueError, match="needs a PRM scorer"):
        asyncio.run(run_search(prompt_ids(HARD[0]), FakeArithmeticPolicy(), None, opts,
                               task.extract_answer))
    # With truncation by PRM, majority needs one too.
    with pytest.raises(ValueError, match="needs a PRM scorer"):
        _run(HARD[0], FakeArithmeticPolicy(), n=2, truncate={"by": "prm"})
    assert _run(HARD[0], FakeArithmeticPolicy(), FakeArithmeticPRM(), n=2,
                truncate={"by": "prm"}).answer is not None
