"""Monte-Carlo labeller: exact testbed ground truth, labels over the deterministic fake policy
(whose mistakes are unrecoverable, so off-track prefixes must score 0), call structure."""
import asyncio

import pytest

from tests.fakes import FakeArithmeticPolicy, RecordingGenerator
from ttc_vllm.prm.label import mc_label, read_jsonl, summarize, write_jsonl
from ttc_vllm.search.protocols import StepParams
from ttc_vllm.testbed import prm_data as lbl  # module access: pytest would collect test*-named imports
from ttc_vllm.testbed import task
from ttc_vllm.testbed.prm_data import parse_tiers, training_problems
from ttc_vllm.testbed.task import STEP_TAG
from ttc_vllm.testbed.tokenizer import load_testbed_tokenizer

P = task.Problem((5, 7, 9))
TASK = lbl.TestbedLabelTask(load_testbed_tokenizer())


@pytest.mark.parametrize("steps,expected", [
    (["\n5+7=12<step>"], True),
    (["\n5+7=12<step>", "\n12+9=21<step>", "\n</think>\nAnswer: 21"], True),
    (["\n9+5=14<step>", "\n14+7=21<step>", "check 9+5=14<step>"], True),   # any order; checks
    (["\n5+7=13<step>"], False),                                          # wrong sum
    (["\n5+8=13<step>"], False),                                          # 8 is not a term
    (["\n5+5=10<step>"], False),                                          # 5 used twice
    (["\n5+7=12<step>", "\n11+9=20<step>"], False),                       # left operand != total
    (["\n5+7=12<step>", "\n12+9=21<step>", "check 5+7=13<step>"], False),  # wrong check
    (["\n5+7=12<step>", "\n</think>\nAnswer: 12"], False),                 # answers too early
    (["\nfive<step>"], False),
])
def test_testbed_prefix_correct(steps, expected):
    assert lbl.testbed_prefix_correct(P, steps) is expected


def run_labels(policy, problems, traces=3, rollouts=4, own=True):
    gen = RecordingGenerator(policy)
    stats = {}
    rows = asyncio.run(mc_label(gen, TASK, problems, traces, rollouts, StepParams(max_tokens=256),
                                stats, count_own_continuation=own))
    return gen, rows, stats


def test_perfect_policy_labels_every_step_one():
    problems = task.generate("medium", 3, seed=0)
    _, rows, stats = run_labels(FakeArithmeticPolicy(seed=1, mistake_rate=0.0), problems)
    assert rows and all(r["mc_value"] == 1.0 and r["exact_prefix_correct"] for r in rows)
    assert stats["traces"] == 9 and stats["dropped_traces"] == 0


def test_labels_of_a_mistaken_policy():
    problems = task.generate("hard", 6, seed=2)
    gen, rows, stats = run_labels(FakeArithmeticPolicy(seed=3, mistake_rate=0.3), problems,
                                  traces=4, rollouts=6, own=False)
    # two rounds, one call each: traces, then k rollouts of every distinct non-final prefix
    assert [(kind, n) for kind, _, n, _ in gen.calls] == [("complete", 4), ("complete", 6)]
    rollout_prefixes = gen.calls[1][1]
    assert len(set(rollout_prefixes)) == len(rollout_prefixes) == stats["prefixes"]
    wins = {p: sum(_right(p, c) for c in outs)
            for p, outs in zip(rollout_prefixes, gen.calls[1][3])}
    by_trace = {}
    for r in rows:
        by_trace.setdefault(r["trace_id"], []).append(r)
        if r["final"]:  # decided by the answer itself, no rollouts
            assert r["rollouts"] == 1 and r["mc_value"] == float(r["trace_correct"])
        else:
            prefix = tuple(r["prompt_token_ids"] + sum(r["step_token_ids"], []))
            assert r["rollouts"] == 6 and r["correct_rollouts"] == wins[prefix]
            assert r["mc_value"] == r["correct_rollouts"] / 6
        if not r["exact_prefix_correct"]:
            assert r["mc_value"] == 0.0  # the fake's +10 mistakes can never be undone
    assert any(not r["exact_prefix_correct"] for r in rows)
    assert any(0 < r["mc_value"] < 1 for r in rows)  # on-track prefixes with risky rollouts
    for steps in by_trace.values():
        assert [r["step_index"] for r in steps] == list(range(steps[0]["num_steps"]))
        # once off track, always off track
        flags = [r["exact_prefix_correct"] for r in steps]
        assert flags == sorted(flags, reverse=True)
        assert steps[-1]["trace_correct"] == steps[-1]["exact_prefix_correct"]


def _right(prefix, completion):
    """Whether a rollout of a testbed prefix reaches the sum of the prefix's problem."""
    tok = load_testbed_tokenizer()
    question = tok.decode(list(prefix)).split("Q: ", 1)[1].split("=?", 1)[0]
    answer = task.extract_answer("".join(s.text for s in completion))
    return answer == sum(int(t) for t in question.split("+"))


def test_own_continuation_counts_as_one_more_rollout():
    problems = task.generate("hard", 4, seed=5)
    policy = FakeArithmeticPolicy(seed=6, mistake_rate=0.3)
    _, with_own, _ = run_labels(policy, problems, traces=3, rollouts=2, own=True)
    _, without, _ = run_labels(FakeArithmeticPolicy(seed=6, mistake_rate=0.3), problems,
                               traces=3, rollouts=2, own=False)
    assert len(with_own) == len(without)
    for a, b in zip(with_own, without):
        assert a["step_token_ids"] == b["step_token_ids"]
        if a["final"]:
            assert a == b
        else:
            assert a["rollouts"] == 3
            assert a["correct_rollouts"] == b["correct_rollouts"] + a["trace_correct"]
            assert a["mc_value"] == pytest.approx(a["correct_rollouts"] / 3)


def test_zero_rollouts_labels_every_step_by_its_trace_outcome():
    gen, rows, stats = run_labels(FakeArithmeticPolicy(seed=7, mistake_rate=0.3),
                                  task.generate("hard", 4, seed=7), traces=3, rollouts=0)
    assert [kind for kind, *_ in gen.calls] == ["complete"]  # no rollout round
    assert stats["prefixes"] == 0
    assert all(r["rollouts"] == 1 and r["mc_value"] == float(r["trace_correct"]) for r in rows)
    with pytest.raises(ValueError, match="rollouts"):
        run_labels(FakeArithmeticPolicy(), task.generate("easy", 1, seed=0), rollouts=0, own=False)


def test_rows_round_trip_and_summary(tmp_path):
    _, rows, _ = run_labels(FakeArithmeticPolicy(seed=4, mistake_rate=0.5), task.generate("easy", 4, seed=0))
    path = tmp_path / "labels.jsonl"
    write_jsonl(rows, path)
    assert read_jsonl(path) == rows
    s = summarize(rows)
    finals = [r for r in rows if r["final"]]
    assert s["rows"] == len(rows) and s["traces"] == len(finals)
    assert s["trace_accuracy"] == pytest.approx(sum(r["trace_correct"] for r in finals) / len(finals), abs=1e-4)


def test_unfinished_traces_are_dropped():
    problems = task.generate("hard", 2, seed=0)
    gen = FakeArithmeticPolicy(seed=0)
    stats = {}
    rows = asyncio.run(mc_label(gen, TASK, problems, 2, 2, StepParams(max_tokens=10), stats))
    assert rows == [] and stats["dropped_traces"] == 4


def test_training_problems_and_tiers():
    assert parse_tiers("easy:2, hard:3") == {"easy": 2, "hard": 3}
    with pytest.raises(ValueError, match="unknown tier"):
        parse_tiers("extreme:3")
    with pytest.raises(ValueError, match="positive"):
        parse_tiers("easy:0")
    with pytest.raises(ValueError, match="name:count"):
        parse_tiers("easy")
    probs = training_problems({"easy": 5, "hard": 5}, seed=0)
    assert probs == training_problems({"easy": 5, "hard": 5}, seed=0)
    assert [p.tier for p in probs] == ["easy"] * 5 + ["hard"] * 5
    assert set(probs[5:]).isdisjoint(task.generate("hard", 5, seed=0))  # not the eval stream
    with pytest.raises(ValueError):
        asyncio.run(mc_label(FakeArithmeticPolicy(), TASK, probs, 0, 2, StepParams()))


@pytest.mark.engine
def test_labels_from_the_real_policy(llm):
    from ttc_vllm.engine_offline import OfflineStepGenerator

    gen = OfflineStepGenerator(llm, STEP_TAG)
    problems = training_problems({"medium": 2}, seed=0)
    stats = {}
    rows = asyncio.run(mc_label(gen, lbl.TestbedLabelTask(llm.get_tokenizer()), problems, 2, 3,
                                StepParams(temperature=0.8, max_tokens=400), stats))
    assert stats["traces"] + stats["dropped_traces"] == 4
    assert stats["traces"] >= 1 and rows  # 400 tokens fit a medium trace
    for r in rows:
        assert 0.0 <= r["mc_value"] <= 1.0
        # 3 rollouts, plus the trace's own continuation (counted by default)
        assert r["rollouts"] == (1 if r["final"] else 3 + 1)
