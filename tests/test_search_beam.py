import asyncio

from tests import fakes
from ttc_vllm.search import SearchOptions, Trace, run_search
from ttc_vllm.search.beam import top_distinct
from tests.fakes import FakeArithmeticPolicy, FakeArithmeticPRM, RecordingGenerator, prompt_ids
from ttc_vllm.search.protocols import Candidate, Step
from ttc_vllm.testbed import task

HARD = fakes.hard_problems(10, seed=1)


def _run(strategy, problem, generator, scorer=None, **options):
    opts = SearchOptions(strategy=strategy, **options)
    return asyncio.run(run_search(prompt_ids(problem), generator, scorer, opts, task.extract_answer))


def test_beam_with_a_perfect_prm_finds_what_majority_misses():
    beam_right = majority_right = 0
    for i, p in enumerate(HARD):
        beam = _run("beam", p, FakeArithmeticPolicy(seed=i), FakeArithmeticPRM(), n=8, beam_width=4)
        majority = _run("majority", p, FakeArithmeticPolicy(seed=i), n=8)
        beam_right += beam.answer == str(p.answer)
        majority_right += majority.answer == str(p.answer)
    assert beam_right == len(HARD)
    assert majority_right <= 3


def test_every_expansion_continues_a_candidate_it_was_given():
    problem = HARD[0]
    gen = RecordingGenerator(FakeArithmeticPolicy(seed=0))
    _run("beam", problem, gen, FakeArithmeticPRM(), n=8, beam_width=4)
    assert all(kind == "generate_steps" for kind, *_ in gen.calls)
    assert gen.calls[0][1] == [tuple(prompt_ids(problem))]
    returned = set()
    for k, (_, prefixes, n, outputs) in enumerate(gen.calls):
        if k:
            assert all(p in returned for p in prefixes)
        returned |= {p + s.token_ids for p, samples in zip(prefixes, outputs) for s in samples}


def test_round_budget_and_stopping():
    for i, p in enumerate(HARD[:4]):
        gen = RecordingGenerator(FakeArithmeticPolicy(seed=i))
        result = _run("beam", p, gen, FakeArithmeticPRM(), n=8, beam_width=2)
        assert all(len(prefixes) * n <= 8 for _, prefixes, n, _ in gen.calls)
        assert all(n == 2 for _, _, n, _ in gen.calls[1:])
        assert len(result.candidates) <= 4
        assert all(c.finished for c in result.candidates)  # stopped once the whole beam finished


def test_accounting_matches_what_the_generator_and_scorer_saw():
    problem = HARD[1]
    gen = RecordingGenerator(FakeArithmeticPolicy(seed=1))
    prm = FakeArithmeticPRM()
    acc = _run("beam", problem, gen, prm, n=8, beam_width=4).accounting
    steps = [s for _, _, _, outputs in gen.calls for samples in outputs for s in samples]
    prefixes = [p for _, ps, _, _ in gen.calls for p in ps]
    assert acc.generated_tokens == sum(len(s.token_ids) for s in steps)
    assert acc.prompt_tokens == sum(len(p) for p in prefixes)
    # Each later prefix is a sequence the engine produced before: all but its last token cached.
    assert acc.cached_prompt_tokens == sum(len(p) - 1 for _, ps, _, _ in gen.calls[1:] for p in ps)
    assert acc.nodes_expanded == len(prefixes)
    assert acc.generator_calls == len(gen.calls) == acc.prm_calls == len(prm.calls)
    assert acc.prm_traces == len(steps) == sum(prm.calls)


def test_halted_counts_pruned_and_cut_candidates():
    problem = task.Problem((11, 22, 33, 44))  # 3 additions + the answer: 4 steps
    one = _run("beam", problem, FakeArithmeticPolicy(), FakeArithmeticPRM(), n=8, beam_width=4,
               max_steps=1)
    assert one.accounting.halted == 8  # 8 children, none finished, none continued
    two = _run("beam", problem, FakeArithmeticPolicy(), FakeArithmeticPRM(), n=8, beam_width=4,
               max_steps=2)
    assert two.accounting.halted == 8 + 8 - 2  # the 2 kept after round 1 were continued
    assert two.answer is None and len(two.candidates) == 2


def _candidate(ids, score):
    return Candidate(Trace((1,), (Step(ids, "", False),)), (score,), score)


def test_top_distinct_skips_duplicates_and_keeps_order_on_ties():
    a, a_dup, b, c = _candidate((5,), 0.9), _candidate((5,), 0.9), _candidate((6,), 0.9), _candidate((7,), 0.3)
    assert top_distinct([c, a, a_dup, b], 2) == [a, b]
    assert top_distinct([c, a, a_dup], 3) == [a, c]
