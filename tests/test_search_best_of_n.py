import asyncio

import pytest

from tests import fakes
from ttc_vllm.search import SearchOptions, run_search
from tests.fakes import FakeArithmeticPolicy, FakeArithmeticPRM, ScriptedGenerator, ScriptedScorer, prompt_ids
from ttc_vllm.testbed import task

HARD = fakes.hard_problems(10, seed=1)
PROBLEM = task.Problem((1, 2, 4))

A = ["\n1+2=3<step>", "\n3+4=7<step>", "\n</think>\nAnswer: 7"]
B = ["\n1+2=3<step>", "\n3+4=8<step>", "\n</think>\nAnswer: 8"]
SCORES = {"".join(A): [0.9, 0.2, 0.9], "".join(B): [0.5, 0.5, 0.5]}


@pytest.mark.parametrize("aggregation,answer", [
    ("min", "8"),   # A's weak middle step sinks it: 0.2 < 0.5
    ("last", "7"),  # 0.9 > 0.5
    ("mean", "7"),  # 0.667 > 0.5
    ("prod", "7"),  # 0.162 > 0.125
])
def test_aggregation_decides_the_pick(aggregation, answer):
    opts = SearchOptions(strategy="best_of_n", n=2, aggregation=aggregation)
    result = asyncio.run(run_search(prompt_ids(PROBLEM), ScriptedGenerator([A, B]),
                                    ScriptedScorer(SCORES), opts, task.extract_answer))
    assert result.answer == answer
    assert result.chosen.score == max(c.score for c in result.candidates)


def test_best_single_trace_beats_a_crowd():
    c = ["\n1+2=3<step>", "\n3+4=8<step>", "\n</think>\nAnswer: 8"]
    d = ["\n2+1=3<step>", "\n3+4=8<step>", "\n</think>\nAnswer: 8"]
    e = ["\n1+4=5<step>", "\n5+2=7<step>", "\n</think>\nAnswer: 7"]
    table = {"".join(c): [0.6] * 3, "".join(d): [0.6] * 3, "".join(e): [0.9] * 3}
    opts = SearchOptions(strategy="best_of_n", n=3)
    result = asyncio.run(run_search(prompt_ids(PROBLEM), ScriptedGenerator([c, d, e]),
                                    ScriptedScorer(table), opts, task.extract_answer))
    assert result.answer == "7"


def test_with_a_perfect_prm_it_is_right_exactly_when_a_sample_is():
    for i, problem in enumerate(HARD):
        opts = SearchOptions(strategy="best_of_n", n=8)
        result = asyncio.run(run_search(prompt_ids(problem), FakeArithmeticPolicy(seed=i),
                                        FakeArithmeticPRM(), opts, task.extract_answer))
        any_right = any(c.answer == str(problem.answer) for c in result.candidates)
        assert (result.answer == str(problem.answer)) == any_right
