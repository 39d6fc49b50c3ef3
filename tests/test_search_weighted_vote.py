import asyncio

from tests import fakes
from ttc_vllm.search import SearchOptions, run_search
from tests.fakes import FakeArithmeticPolicy, FakeArithmeticPRM, ScriptedGenerator, ScriptedScorer, prompt_ids
from ttc_vllm.testbed import task

HARD = fakes.hard_problems(10, seed=1)
PROBLEM = task.Problem((1, 2, 4))


def test_crowd_of_decent_traces_beats_one_strong_trace():
    c = ["\n1+2=3<step>", "\n3+4=8<step>", "\n</think>\nAnswer: 8"]
    d = ["\n2+1=3<step>", "\n3+4=8<step>", "\n</think>\nAnswer: 8"]
    e = ["\n1+4=5<step>", "\n5+2=7<step>", "\n</think>\nAnswer: 7"]
    table = {"".join(c): [0.6] * 3, "".join(d): [0.6] * 3, "".join(e): [0.9] * 3}
    opts = SearchOptions(strategy="weighted_vote", n=3)
    result = asyncio.run(run_search(prompt_ids(PROBLEM), ScriptedGenerator([c, d, e]),
                                    ScriptedScorer(table), opts, task.extract_answer))
    assert result.answer == "8"  # 0.6 + 0.6 > 0.9
    assert result.chosen.trace.text == "".join(c)  # first of the equally scored winners


def test_prm_weights_overturn_the_biased_majority():
    right = 0
    for i, problem in enumerate(HARD):
        opts = SearchOptions(strategy="weighted_vote", n=8)
        result = asyncio.run(run_search(prompt_ids(problem), FakeArithmeticPolicy(seed=i),
                                        FakeArithmeticPRM(), opts, task.extract_answer))
        any_right = any(c.answer == str(problem.answer) for c in result.candidates)
        assert (result.answer == str(problem.answer)) == any_right
        right += any_right
    assert right >= 3  # the check above is not vacuous


def test_prm_accounting():
    problem = HARD[0]
    opts = SearchOptions(strategy="weighted_vote", n=5)
    prm = FakeArithmeticPRM()
    result = asyncio.run(run_search(prompt_ids(problem), FakeArithmeticPolicy(seed=0), prm,
                                    opts, task.extract_answer))
    acc = result.accounting
    assert prm.calls == [5]
    assert (acc.prm_calls, acc.prm_traces) == (1, 5)
    assert acc.prm_tokens == sum(len(c.trace.token_ids) for c in result.candidates)
    for c in result.candidates:
        assert len(c.step_scores) == len(c.trace.steps)
        assert c.score == min(c.step_scores)  # default aggregation
