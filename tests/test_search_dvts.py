import asyncio

from tests import fakes
from ttc_vllm.search import SearchOptions, run_search
from tests.fakes import FakeArithmeticPolicy, FakeArithmeticPRM, RecordingGenerator, prompt_ids
from ttc_vllm.testbed import task

HARD = fakes.hard_problems(10, seed=1)


def _run(problem, generator, **options):
    opts = SearchOptions(strategy="dvts", **options)
    return asyncio.run(run_search(prompt_ids(problem), generator, FakeArithmeticPRM(), opts,
                                  task.extract_answer))


def test_dvts_with_a_perfect_prm_solves_the_hard_tier():
    assert all(_run(p, FakeArithmeticPolicy(seed=i), n=8, beam_width=4).answer == str(p.answer)
               for i, p in enumerate(HARD))


def test_subtrees_are_independent_greedy_searches():
    n, width = 12, 3
    for i, problem in enumerate(HARD[:4]):
        gen = RecordingGenerator(FakeArithmeticPolicy(seed=i))
        result = _run(problem, gen, n=n, beam_width=width)
        _, first_prefixes, first_n, first_out = gen.calls[0]
        assert (len(first_prefixes), first_n) == (1, n)
        # One head per subtree; head i descends from one of subtree i's first samples.
        assert len(result.candidates) == n // width
        for i_sub, head in enumerate(result.candidates):
            group = first_out[0][i_sub * width:(i_sub + 1) * width]
            assert head.trace.steps[0] in group
        # Later rounds expand at most one head per subtree by beam_width, never a finished one.
        sizes = [len(prefixes) for _, prefixes, _, _ in gen.calls[1:]]
        assert all(n_ == width for _, _, n_, _ in gen.calls[1:])
        assert sizes == sorted(sizes, reverse=True) and all(s <= n // width for s in sizes)
        assert all(c.finished for c in result.candidates)


def test_one_prm_call_per_round():
    gen = RecordingGenerator(FakeArithmeticPolicy(seed=2))
    acc = _run(HARD[2], gen, n=8, beam_width=2).accounting
    assert acc.prm_calls == acc.generator_calls == len(gen.calls)
    assert acc.prm_traces == sum(len(ps) * n for _, ps, n, _ in gen.calls)
