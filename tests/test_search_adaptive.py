"""Adaptive sampling (search.adaptive): the voting strategies sample in waves and stop once
the leading answer holds the consensus share -- counted, for weighted_vote, with PRM weights."""
import asyncio

import pytest
from pydantic import ValidationError

from ttc_vllm.search import SearchOptions, run_search
from tests.fakes import FakeArithmeticPolicy, FakeArithmeticPRM, ScriptedScorer, hard_problems, prompt_ids
from ttc_vllm.testbed.tokenizer import load_testbed_tokenizer
from ttc_vllm.search.protocols import Step
from ttc_vllm.testbed import task

PROBLEM = task.Problem((12, 30))


def trace(answer: int | None, extra: str = "") -> list[str]:
    """A two-step completion answering `answer` (None: cut before the answer line)."""
    first = f"\n12+30=42{extra}<step>\n"
    if answer is None:
        return [first]
    return [first, f"</think>\nAnswer: {answer}</s>"]


class QueueGenerator:
    """Hands out scripted completions in order across `complete` calls (one wave each) and
    records the n of every call; a completion without an answer line stays unfinished."""

    def __init__(self, completions):
        self.queue = list(completions)
        self.calls: list[int] = []

    async def complete(self, prefixes, n, params):
        tok = load_testbed_tokenizer()
        self.calls.append(n)
        taken, self.queue = self.queue[:n], self.queue[n:]
        if len(taken) < n:
            raise AssertionError(f"search asked for {n} more traces than scripted")
        out = [tuple(Step(tok.encode(text, add_special_tokens=False), text,
                          finished=k == len(steps) - 1 and "Answer" in text)
                     for k, text in enumerate(steps)) for steps in taken]
        return [out for _ in prefixes]

    async def generate_steps(self, prefixes, n, params):
        raise NotImplementedError


def run(strategy, completions, scorer=None, **adaptive):
    gen = QueueGenerator(completions)
    n = adaptive.pop("n", 16)
    opts = SearchOptions(strategy=strategy, n=n, adaptive=adaptive)
    result = asyncio.run(run_search(prompt_ids(PROBLEM), gen, scorer, opts, task.extract_answer))
    return result, gen.calls


def test_agreeing_first_wave_ends_sampling():
    result, calls = run("majority", [trace(42)] * 16, waves=[2, 2, 4, 4, 4])
    assert calls == [2] and len(result.candidates) == 2 and result.answer == "42"
    assert result.accounting.generator_calls == 1
    assert result.accounting.generated_tokens == sum(
        len(c.trace.token_ids) - len(prompt_ids(PROBLEM)) for c in result.candidates)


def test_contested_answers_get_every_wave():
    alternating = [trace(42 if i % 2 else 43) for i in range(16)]
    result, calls = run("majority", alternating, waves=[2, 2, 4, 4, 4])
    assert calls == [2, 2, 4, 4, 4] and len(result.candidates) == 16


def test_exit_waits_for_the_consensus_share_and_min_votes():
    # 3 of 4 agree after wave 2 (share 0.75): exits at consensus 0.75, not at 0.8
    answers = [trace(42), trace(43), trace(42), trace(42)] + [trace(42)] * 12
    assert run("majority", answers, waves=[2, 2, 4, 4, 4], consensus=0.75)[1] == [2, 2]
    assert run("majority", answers, waves=[2, 2, 4, 4, 4], consensus=0.8)[1] == [2, 2, 4]
    # one agreeing answer is not a consensus below min_votes
    assert run("majority", [trace(42)] * 16, waves=[1, 1, 2, 4, 8], min_votes=3)[1] == [1, 1, 2]


def test_unanswered_traces_do_not_vote():
    # the first wave has one answer and one cut trace: below min_votes 2, so sampling goes on
    completions = [trace(42), trace(None)] + [trace(42)] * 14
    result, calls = run("majority", completions, waves=[2, 2, 4, 4, 4])
    assert calls == [2, 2] and result.answer == "42"
    assert result.accounting.halted == 1


def test_default_waves_are_fours():
    result, calls = run("majority", [trace(42 if i % 2 else 43) for i in range(10)], n=10)
    assert calls == [4, 4, 2]


def test_weighted_vote_exits_on_prm_weighted_consensus():
    """Two traces disagree; the PRM trusts one (0.9 vs 0.1): weighted_vote's share is 0.9
    and it stops, majority's is 0.5 and it samples on."""
    right, wrong = trace(42), trace(43, extra="")
    scorer = ScriptedScorer({"".join(right): [0.9, 0.9], "".join(wrong): [0.9, 0.1]})
    completions = [wrong, right] + [right] * 14
    result, calls = run("weighted_vote", completions, scorer=scorer, waves=[2, 2, 4, 4, 4])
    assert calls == [2] and result.answer == "42"
    assert result.accounting.prm_calls == 1 and result.accounting.prm_traces == 2
    assert all(c.step_scores is not None for c in result.candidates)
    assert run("majority", completions, waves=[2, 2, 4, 4, 4])[1] == [2, 2]


def test_counted_exit_ignores_prm_weights_and_scores_once_at_the_end():
    """The same disagreeing first wave with exit_votes="counted": 1 of 2 is no consensus, so
    weighted_vote samples on like majority; every trace is scored in one PRM call after the
    last wave, and the decision is still PRM-weighted."""
    right, wrong = trace(42), trace(43)
    scorer = ScriptedScorer({"".join(right): [0.9, 0.9], "".join(wrong): [0.9, 0.1]})
    # after wave 2: 42 has 2 of 4 counted votes (no consensus at 0.75), 43 has 2;
    # after wave 3 (4 more 42s): 6 of 8 -> exit
    completions = [wrong, right, wrong, right] + [right] * 12
    result, calls = run("weighted_vote", completions, scorer=scorer, waves=[2, 2, 4, 4, 4],
                        exit_votes="counted")
    assert calls == [2, 2, 4] and result.answer == "42"
    assert result.accounting.prm_calls == 1 and result.accounting.prm_traces == 8
    assert all(c.step_scores is not None for c in result.candidates)
    # weighted exit on the same traces stops after the first wave (0.9 of the weight)
    assert run("weighted_vote", completions, scorer=scorer, waves=[2, 2, 4, 4, 4])[1] == [2]


def test_counted_exit_decides_by_prm_weight():
    """Counted agreement ends sampling (3 of 4 say 43), but the PRM distrusts those traces:
    the weighted decision picks 42, which majority would not."""
    right, wrong = trace(42), trace(43)
    scorer = ScriptedScorer({"".join(right): [0.9, 0.9], "".join(wrong): [0.9, 0.05]})
    completions = [wrong, wrong, wrong, right] + [right] * 12
    result, calls = run("weighted_vote", completions, scorer=scorer, waves=[4, 4, 4, 4],
                        exit_votes="counted")
    assert calls == [4] and result.answer == "42"
    assert run("majority", completions, waves=[4, 4, 4, 4])[0].answer == "43"


def test_weighted_vote_scores_each_wave_once():
    scorer = FakeArithmeticPRM()
    problem = hard_problems(1, seed=3)[0]
    opts = SearchOptions(strategy="weighted_vote", n=12, adaptive={"waves": [4, 4, 4], "consensus": 1.0})
    result = asyncio.run(run_search(prompt_ids(problem), FakeArithmeticPolicy(seed=2), scorer, opts,
                                    task.extract_answer))
    acc = result.accounting
    waves = acc.generator_calls
    assert acc.prm_calls == waves and acc.prm_traces == len(result.candidates) == 4 * waves


@pytest.mark.parametrize("bad, where", [
    (dict(strategy="best_of_n", adaptive={}), "adaptive applies only to strategies majority, weighted_vote"),
    (dict(strategy="beam", adaptive={}), "adaptive applies only"),
    (dict(strategy="majority", adaptive={"waves": [4, 4]}), "must sum to n (16)"),
    (dict(strategy="majority", adaptive={"waves": [0, 16]}), "at least 1 trace"),
    (dict(strategy="majority", adaptive={"consensus": 0.5}), "adaptive.consensus"),
    (dict(strategy="majority", adaptive={"consensus": 1.5}), "adaptive.consensus"),
    (dict(strategy="majority", adaptive={"min_votes": 0}), "adaptive.min_votes"),
    (dict(strategy="majority", adaptive={"wave": 4}), "adaptive.wave"),
    (dict(strategy="majority", adaptive={"exit_votes": "weighted"}), "adaptive.exit_votes 'weighted' needs"),
    (dict(strategy="weighted_vote", adaptive={"exit_votes": "prm"}), "adaptive.exit_votes"),
    (dict(strategy="majority", adaptive={}, truncate={}), "cannot be combined"),
])
def test_bad_adaptive_options_name_the_problem(bad, where):
    with pytest.raises(ValidationError, match=where.replace("(", r"\(").replace(")", r"\)")):
        SearchOptions(n=16, **bad)
