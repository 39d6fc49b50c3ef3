import asyncio

import pytest

from tests import fakes
from ttc_vllm.search import SearchOptions, Trace, run_search
from tests.fakes import FakeArithmeticPolicy, FakeArithmeticPRM, RecordingGenerator, prompt_ids
from ttc_vllm.search.mcts import Node, backpropagate, puct, select_leaf
from ttc_vllm.search.protocols import Candidate
from ttc_vllm.testbed import task

HARD = fakes.hard_problems(10, seed=1)
ROOT = Candidate(Trace((1,)))


def _run(problem, generator, **options):
    opts = SearchOptions(strategy="mcts", **options)
    return asyncio.run(run_search(prompt_ids(problem), generator, FakeArithmeticPRM(), opts,
                                  task.extract_answer))


def _tree(values_and_visits):
    root = Node(ROOT, 0)
    root.children = [Node(ROOT, 1, root, visits=v, value_sum=q * v) for q, v in values_and_visits]
    root.visits = sum(v for _, v in values_and_visits)
    return root


def test_puct_by_hand():
    root = _tree([(0.5, 2), (0.2, 4), (0.8, 3)])  # 9 visits, 3 children
    # value + c * (1/3) * sqrt(9) / (1 + 2) with values normalised over [0, 1]
    assert puct(root.children[0], root, 1.5, 0.0, 1.0) == pytest.approx(0.5 + 1.5 / 3)
    # normalised over [0.2, 0.8]: (0.5 - 0.2) / 0.6 = 0.5
    assert puct(root.children[0], root, 1.5, 0.2, 0.8) == pytest.approx(0.5 + 1.5 / 3)
    assert puct(root.children[1], root, 1.0, 0.2, 0.8) == pytest.approx(0.0 + 3 / 3 / 5)


def test_selection_trades_value_against_visits():
    equal_visits = _tree([(0.3, 2), (0.7, 2)])
    assert select_leaf(equal_visits, 1.0, 0.0, 1.0) is equal_visits.children[1]
    equal_values = _tree([(0.5, 6), (0.5, 2)])
    assert select_leaf(equal_values, 1.0, 0.0, 1.0) is equal_values.children[1]
    # A big visit gap beats a small value gap only with enough exploration.
    tree = _tree([(0.6, 30), (0.5, 1)])
    assert select_leaf(tree, 0.01, 0.0, 1.0) is tree.children[0]
    assert select_leaf(tree, 2.0, 0.0, 1.0) is tree.children[1]


def test_backpropagate_adds_values_along_the_path():
    root = Node(ROOT, 0)
    mid = Node(ROOT, 1, root)
    leaf = Node(ROOT, 2, mid)
    backpropagate(leaf, [0.5, 0.25])
    backpropagate(mid, [1.0])
    assert (leaf.visits, leaf.value_sum) == (2, 0.75)
    assert (mid.visits, mid.value_sum) == (3, 1.75)
    assert (root.visits, root.value_sum) == (3, 1.75)


def test_mcts_with_a_perfect_prm_solves_the_hard_tier():
    for i, p in enumerate(HARD):
        gen = RecordingGenerator(FakeArithmeticPolicy(seed=i))
        result = _run(p, gen, n=8, beam_width=4, mcts={"c_puct": 1.0, "rollouts": 64})
        assert result.answer == str(p.answer)
        # one expansion per rollout: one prefix, beam_width samples
        steps = [c for c in gen.calls if c[0] == "generate_steps"]
        assert all(len(prefixes) == 1 and n == 4 for _, prefixes, n, _ in steps)
        assert len(steps) <= 64


def test_stops_once_n_traces_finished():
    result = _run(HARD[0], FakeArithmeticPolicy(seed=0), n=1, beam_width=4,
                  mcts={"rollouts": 500})
    assert 1 <= len(result.candidates) <= 4  # the expansion that finished one may finish more
    assert all(c.finished for c in result.candidates)
    assert result.accounting.generator_calls < 500


def test_without_a_finished_trace_the_best_leaf_is_completed():
    gen = RecordingGenerator(FakeArithmeticPolicy(seed=0))
    result = _run(HARD[0], gen, n=8, beam_width=4, mcts={"rollouts": 1})
    assert [kind for kind, *_ in gen.calls] == ["generate_steps", "complete"]
    # the completed prefix is the best-valued child of the root
    _, _, _, [children] = gen.calls[0]
    root_ids = tuple(prompt_ids(HARD[0]))
    prm = FakeArithmeticPRM()
    values = [prm.score_trace(Trace(root_ids, (s,)))[-1] for s in children]
    assert gen.calls[1][1] == [root_ids + children[values.index(max(values))].token_ids]
    assert len(result.candidates) == 1 and result.candidates[0].finished
