"""A search request's thinking controls reach every engine request it makes (pure)."""
import asyncio

import pytest

from ttc_vllm.engine_offline import Delimiter, step_sampling_kwargs
from ttc_vllm.options import EXTRA_ARGS_KEY, TTCOptions
from ttc_vllm.search import SearchOptions, StepParams, run_search
from ttc_vllm.search.controls import ControlledGenerator
from tests.fakes import FakeArithmeticPolicy, FakeArithmeticPRM, hard_problems, prompt_ids
from ttc_vllm.testbed import task


class ParamsRecorder:
    """Records the StepParams of every call of the wrapped generator."""

    def __init__(self, inner):
        self.inner = inner
        self.params: list[StepParams] = []
        self.encode = lambda text: [1, 2]

    async def generate_steps(self, prefixes, n, params):
        self.params.append(params)
        return await self.inner.generate_steps(prefixes, n, params)

    async def complete(self, prefixes, n, params):
        self.params.append(params)
        return await self.inner.complete(prefixes, n, params)


@pytest.mark.parametrize("strategy", ["majority", "weighted_vote", "best_of_n", "beam", "dvts", "mcts"])
def test_every_call_of_every_strategy_carries_the_controls(strategy):
    controls = TTCOptions(max_think=40).sample_controls()
    rec = ParamsRecorder(FakeArithmeticPolicy(seed=3))
    problem = hard_problems(1, seed=2)[0]
    opts = SearchOptions(strategy=strategy, n=4, beam_width=2, max_steps=12, mcts={"rollouts": 4})
    result = asyncio.run(run_search(prompt_ids(problem), rec, FakeArithmeticPRM(), opts,
                                    task.extract_answer, controls=controls))
    assert result.candidates and rec.params
    assert {p.controls for p in rec.params} == {controls}
    # without controls the calls carry none
    rec = ParamsRecorder(FakeArithmeticPolicy(seed=3))
    asyncio.run(run_search(prompt_ids(problem), rec, FakeArithmeticPRM(), opts, task.extract_answer))
    assert {p.controls for p in rec.params} == {None}


def test_wrapper_keeps_the_inner_generators_other_attributes():
    inner = ParamsRecorder(FakeArithmeticPolicy())
    wrapped = ControlledGenerator(inner, '{"max_think":5}')
    assert wrapped.encode("x") == [1, 2] and wrapped.params is inner.params


def test_controls_become_the_sub_requests_extra_args():
    params = StepParams(max_tokens=64, controls='{"max_think":12}')
    kwargs = step_sampling_kwargs([1, 2, 3], 2, params, Delimiter("<step>", 7), True, 64, 20, None)
    assert kwargs["extra_args"] == {EXTRA_ARGS_KEY: '{"max_think":12}'}
    assert TTCOptions.from_extra_args(kwargs["extra_args"]).max_think == 12
    plain = step_sampling_kwargs([1, 2, 3], 2, StepParams(), Delimiter("<step>", 7), True, 64, 20, None)
    assert "extra_args" not in plain


def test_sample_controls_drop_the_search_and_are_none_without_controls():
    o = TTCOptions.model_validate({"max_think": 50, "halting": {"signal": "entropy", "threshold": -0.5},
                                   "search": {"strategy": "weighted_vote", "n": 4}})
    sent = TTCOptions.from_extra_args({EXTRA_ARGS_KEY: o.sample_controls()})
    assert sent.search is None and sent.max_think == 50 and sent.halting.threshold == -0.5
    assert TTCOptions.model_validate({"search": {"strategy": "beam", "n": 4}}).sample_controls() is None
    assert TTCOptions().sample_controls() is None


@pytest.mark.parametrize("strategy", ["beam", "dvts", "mcts"])
def test_halting_is_refused_for_step_wise_strategies_budgets_are_not(strategy):
    search = {"strategy": strategy, "n": 4, "beam_width": 2}
    with pytest.raises(ValueError, match="halting: applies to each sampled trace"):
        TTCOptions.from_extra_args({EXTRA_ARGS_KEY: {"halting": {"threshold": 1.0}, "search": search}})
    assert TTCOptions.from_extra_args({EXTRA_ARGS_KEY: {"max_think": 30, "search": search}}).max_think == 30
