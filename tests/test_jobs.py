"""Batch evaluation jobs: items and their bookkeeping, the resumable results file, merged
engine calls, the `job` CLI, the deploy files; fake-policy replicas on a local Ray; one real
run of the shipped testbed policy in a Ray replica."""
import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ttc_vllm.cli import build_parser, main
from ttc_vllm.jobs.errors import JobError
from ttc_vllm.jobs.plan import Item, Plan
from ttc_vllm.jobs.problems import jsonl_problems
from ttc_vllm.jobs.problems import testbed_problems as tiers_problems  # not "test*": pytest would collect it
from ttc_vllm.jobs.replicas import CoalescingGenerator, TokenizingPolicy, resolve_address
from ttc_vllm.jobs.report import format_table, summarize
from ttc_vllm.jobs.run import LocalWorker, evaluate_item, run_items
from ttc_vllm.jobs.store import (
    RAY_JOB_CONFIG_ENV, RESULTS_FILE, STORAGE_ENV, OutputLock, ResultStore, ray_job_id, results_dir,
)
from ttc_vllm.search import StepParams
from tests.fakes import FakeArithmeticPolicy, FakeArithmeticPRM
from ttc_vllm.testbed.tokenizer import load_testbed_tokenizer
from ttc_vllm.testbed import task

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TOK = load_testbed_tokenizer()


def fake_policy(seed: int = 1) -> TokenizingPolicy:
    return TokenizingPolicy(FakeArithmeticPolicy(seed=seed), TOK)


def small_plan(**overrides) -> Plan:
    """2 strategies x 2 n x (3 easy + 3 medium) = 24 items on the fake policy and PRM."""
    values = dict(problems=tiers_problems(["easy", "medium"], 3, seed=0),
                  strategies=["majority", "best_of_n"], ns=[2, 4], search={"temperature": 0.8},
                  policy="fake-policy", prm="fake-prm")
    values.update(overrides)
    return Plan(**values)


def lines_of(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / RESULTS_FILE).read_text().splitlines()]


def outcome(record: dict) -> tuple:
    """What must not depend on batching, interruption or worker: the search's answer."""
    return (record["answer"], record["correct"], record["generated_tokens"], record["text"])


# -- plan and items -------------------------------------------------------------------------

def test_plan_items_cover_the_grid_once_grouped_by_strategy_and_n():
    plan = small_plan()
    items = plan.items()
    assert len(items) == 2 * 2 * 6
    assert len({i.key for i in items}) == len(items)
    assert items[0].key == ("majority", 2, "easy", 0) and items[-1].key == ("best_of_n", 4, "medium", 2)
    groups = [(i.strategy, i.n) for i in items]
    # each (strategy, n) forms one contiguous run
    assert [g for k, g in enumerate(groups) if k == 0 or groups[k - 1] != g] == \
        [("majority", 2), ("majority", 4), ("best_of_n", 2), ("best_of_n", 4)]


def test_testbed_problems_are_the_tier_generator():
    problems = tiers_problems(["hard"], 4, seed=7)
    expected = task.generate("hard", 4, 7)
    assert [(p.tier, p.index) for p in problems] == [("hard", i) for i in range(4)]
    assert [p.prompt for p in problems] == [task.prompt(q) for q in expected]
    assert [p.answer for p in problems] == [str(q.answer) for q in expected]


@pytest.mark.parametrize("overrides, needle", [
    ({"strategies": ["majority", "greedy"]}, "unknown strategy greedy"),
    ({"ns": [4, 0]}, "positive"),
    ({"strategies": ["beam"], "ns": [6]}, "beam_width (4) must divide n (6)"),
    ({"strategies": ["best_of_n"], "prm": None}, "needs a PRM"),
    ({"search": {"temperature": 7.0}}, "temperature"),
    ({"controls": {"max_think": -3}}, "ttc.max_think"),
    ({"controls": {"search": {"strategy": "beam"}}}, "without 'search'"),
    ({"strategies": ["beam"], "ns": [4], "controls": {"halting": {"threshold": 1.0}}},
     "halting: applies to each sampled trace"),
])
def test_plan_rejects_bad_grids(overrides, needle):
    with pytest.raises(JobError) as e:
        small_plan(**overrides)
    assert needle in str(e.value)


def test_adaptive_sampling_reaches_the_search_options_and_the_setup():
    plan = small_plan(strategies=["majority"], ns=[2, 4], search={"adaptive": {"consensus": 0.8}})
    for item in plan.items():
        options = plan.options(item.strategy, item.n)
        assert options.adaptive.consensus == 0.8 and options.adaptive.schedule(item.n) == (min(4, item.n),)
        assert plan.setup(item)["options"]["adaptive"]["consensus"] == 0.8
    # a record sampled all at once does not count as done for the adaptive plan
    assert small_plan(strategies=["majority"], ns=[2]).setup(plan.items()[0]) != plan.setup(plan.items()[0])


def test_plan_controls_reach_every_item_and_its_setup():
    plan = small_plan(controls={"max_think": 64, "conclusion": "<step>\n"})
    sent = json.loads(plan.sample_controls)
    assert sent == {"max_think": 64, "conclusion": "<step>\n"}
    assert all(plan.setup(item)["controls"] == sent for item in plan.items())
    # records made without controls do not count as done for a plan with them, and back
    assert "controls" not in small_plan().setup(plan.items()[0]) and small_plan().sample_controls is None


def test_majority_only_plans_need_no_prm():
    plan = small_plan(strategies=["majority"], prm=None)
    assert plan.setup(plan.items()[0])["prm"] is None


def test_jsonl_dataset_rows_limit_and_errors(tmp_path):
    good = tmp_path / "math.jsonl"
    good.write_text('{"prompt": "1+1=", "answer": 2}\n\n{"prompt": "x", "answer": " a  b "}\n'
                    '{"prompt": "y", "answer": "c"}\n')
    rows = jsonl_problems(good, "math")
    assert [(p.tier, p.index, p.prompt, p.answer) for p in rows] == \
        [("math", 0, "1+1=", "2"), ("math", 1, "x", "a b"), ("math", 2, "y", "c")]
    assert len(jsonl_problems(good, "math", limit=2)) == 2
    for text, needle in [('{"prompt": "p"}\n', ":1: missing 'answer'"),
                         ('{"answer": 1}\n', ":1: expected an object"),
                         ('{"prompt": "p", "answer": 1}\nnot json\n', ":2: not JSON"),
                         ("\n", "holds no rows")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(JobError, match=needle.replace("(", r"\(")):
            jsonl_problems(bad, "bad")


def test_prompts_encode_as_text_or_through_the_chat_template():
    from transformers import AutoTokenizer

    from ttc_vllm.testbed import policy_path

    policy = TokenizingPolicy(None, AutoTokenizer.from_pretrained(str(policy_path())))
    problem = task.generate("easy", 1, 0)[0]
    raw = policy.encode(task.prompt(problem))
    assert raw == TOK.encode(task.prompt(problem), add_special_tokens=False)
    # the testbed chat template renders "<s>Q: {content}\n<think>": the same prompt
    assert policy.encode(problem.question.removeprefix("Q: ").strip(), chat=True) == raw


# -- the results file -------------------------------------------------------------------------

def _record(strategy="majority", n=2, tier="easy", index=0, **extra):
    return {"strategy": strategy, "n": n, "tier": tier, "index": index, "correct": True,
            "generated_tokens": 10, "prm_tokens": 0, "wall_time_s": 0.1, **extra}


def test_store_round_trip_and_first_record_wins(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_record(index=0, answer="3"))
    store.append(_record(index=1))
    store.append(_record(index=0, answer="999"))  # a duplicate line must not replace the first
    again = ResultStore(tmp_path)
    assert set(again.done) == {("majority", 2, "easy", 0), ("majority", 2, "easy", 1)}
    assert again.done[("majority", 2, "easy", 0)]["answer"] == "3"


def test_store_drops_a_torn_last_line_and_appends_cleanly(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_record(index=0))
    full = (tmp_path / RESULTS_FILE).read_bytes()
    with open(tmp_path / RESULTS_FILE, "ab") as f:  # a run killed in the middle of a write
        f.write(json.dumps(_record(index=1)).encode()[:25])
    reopened = ResultStore(tmp_path)
    assert reopened.repaired_bytes == 25 and list(reopened.done) == [("majority", 2, "easy", 0)]
    assert (tmp_path / RESULTS_FILE).read_bytes() == full
    reopened.append(_record(index=1))
    assert [r["index"] for r in lines_of(tmp_path)] == [0, 1]


def test_store_refuses_a_corrupt_line_in_the_middle(tmp_path):
    (tmp_path / RESULTS_FILE).write_text(json.dumps(_record()) + "\n{oops\n" + json.dumps(_record(index=1)) + "\n")
    with pytest.raises(JobError, match=":2: not a result record"):
        ResultStore(tmp_path)


def test_records_made_with_other_settings_are_refused(tmp_path):
    plan = small_plan()
    store = ResultStore(tmp_path)
    item = plan.items()[0]
    store.append(_record(*item.key, setup=plan.setup(item)))
    store.check(plan)  # same settings: fine
    with pytest.raises(JobError, match=r"options\.temperature \(0\.8 there, 1\.0 now\)"):
        store.check(small_plan(search={"temperature": 1.0}))
    with pytest.raises(JobError, match="policy"):
        store.check(small_plan(policy="another-model"))
    other = tiers_problems(["easy", "medium"], 3, seed=1)  # other problems under the same keys
    with pytest.raises(JobError, match="problem_sha"):
        store.check(small_plan(problems=other))


def test_one_writer_per_output_directory(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(JobError, match="another evaluation is writing"):
            with OutputLock(tmp_path):
                pass
    with OutputLock(tmp_path):  # released
        pass


# -- merged engine calls --------------------------------------------------------------------

class RecordingPolicy(FakeArithmeticPolicy):
    """The fake policy, counting calls and their sizes (it is batch-independent, so merged
    calls must give every caller exactly what a call of its own would)."""

    def __init__(self, fail: bool = False):
        super().__init__(seed=3)
        self.sizes: list[tuple[str, int, int]] = []
        self.fail = fail

    async def complete(self, prefixes, n, params):
        self.sizes.append(("complete", len(prefixes), n))
        await asyncio.sleep(0.01)  # an engine call takes time: later calls queue meanwhile
        if self.fail:
            raise RuntimeError("engine died")
        return await super().complete(prefixes, n, params)

    async def generate_steps(self, prefixes, n, params):
        self.sizes.append(("generate_steps", len(prefixes), n))
        await asyncio.sleep(0.01)
        return await super().generate_steps(prefixes, n, params)


def _prompts(k, tier="medium"):
    return [TOK.encode(task.prompt(p), add_special_tokens=False) for p in task.generate(tier, k, 4)]


def test_coalescing_merges_equal_calls_and_keeps_each_callers_rows():
    prompts = _prompts(7)
    params = StepParams(max_tokens=300)
    inner = RecordingPolicy()
    merged = CoalescingGenerator(inner, max_prefixes=4)

    async def run():
        calls = [merged.complete([p], 2, params) for p in prompts[:5]]  # 5 prefixes, max 4 per call
        calls.append(merged.complete(prompts[5:7], 3, params))  # another n: its own call
        calls.append(merged.generate_steps(prompts[:2], 2, params))  # another kind: its own call
        return await asyncio.gather(*calls)

    results = asyncio.run(run())
    assert inner.sizes == [("complete", 4, 2), ("complete", 1, 2), ("complete", 2, 3),
                           ("generate_steps", 2, 2)]
    assert (merged.stats.calls, merged.stats.engine_calls, merged.stats.largest_call) == (7, 4, 4)
    direct = FakeArithmeticPolicy(seed=3)
    for p, got in zip(prompts[:5], results[:5]):
        assert got == asyncio.run(direct.complete([p], 2, params))
    assert results[5] == asyncio.run(direct.complete(prompts[5:7], 3, params))
    assert results[6] == asyncio.run(direct.generate_steps(prompts[:2], 2, params))


def test_coalescing_calls_made_while_the_engine_is_busy_join_the_next_call():
    prompts = _prompts(6)
    params = StepParams(max_tokens=300)
    inner = RecordingPolicy()
    merged = CoalescingGenerator(inner)

    async def run():
        first = asyncio.ensure_future(merged.complete(prompts[:1], 2, params))
        await asyncio.sleep(0.002)  # the engine is busy with the first call now
        rest = [merged.complete([p], 2, params) for p in prompts[1:]]
        return await asyncio.gather(first, *rest)

    asyncio.run(run())
    assert inner.sizes == [("complete", 1, 2), ("complete", 5, 2)]


def test_coalescing_error_reaches_every_caller_of_the_merged_call():
    merged = CoalescingGenerator(RecordingPolicy(fail=True))

    async def run():
        return await asyncio.gather(*(merged.complete([p], 1, StepParams()) for p in _prompts(3)),
                                    return_exceptions=True)

    errors = asyncio.run(run())
    assert all(isinstance(e, RuntimeError) and "engine died" in str(e) for e in errors)


# -- running and resuming (fakes, no Ray) ----------------------------------------------------

def _workers(count=2):
    return [LocalWorker(TokenizingPolicy(CoalescingGenerator(FakeArithmeticPolicy(seed=1)), TOK), f"w{i}")
            for i in range(count)]


def test_item_record_matches_a_direct_search():
    from ttc_vllm.search import SearchOptions, run_search

    plan = small_plan()
    item = Item("best_of_n", 4, plan.problems[4])
    record = asyncio.run(evaluate_item(plan, item, LocalWorker(fake_policy()), FakeArithmeticPRM(), {}))
    ids = TOK.encode(item.problem.prompt, add_special_tokens=False)
    direct = asyncio.run(run_search(ids, FakeArithmeticPolicy(seed=1), FakeArithmeticPRM(),
                                    SearchOptions(strategy="best_of_n", n=4, temperature=0.8),
                                    task.extract_answer))
    assert (record["answer"], record["text"]) == (direct.answer, direct.text)
    assert record["correct"] == (direct.answer == item.problem.answer)
    assert record["generated_tokens"] == direct.accounting.generated_tokens > 0
    assert record["prm_traces"] == 4 and record["worker"] == "local"
    assert record["setup"] == plan.setup(item)
    # every candidate, with what a decision rule needs: re-deciding best-of-N offline on the
    # recorded step scores picks the same answer
    cands = record["candidates"]
    assert len(cands) == 4 and [c["answer"] for c in cands] == [c.answer for c in direct.candidates]
    assert sum(c["tokens"] for c in cands) == record["generated_tokens"]
    assert all(len(c["step_scores"]) == c["steps"] > 0 for c in cands)
    from ttc_vllm.search.aggregate import aggregate_step_scores, best_of_n
    weights = [aggregate_step_scores(c["step_scores"], "min") for c in cands]
    assert cands[best_of_n([c["answer"] for c in cands], weights)]["answer"] == record["answer"]


def test_interrupted_run_resumes_without_duplicates_and_matches_an_uninterrupted_run(tmp_path):
    plan = small_plan()
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    reference_dir.mkdir(), resumed_dir.mkdir()
    reference = ResultStore(reference_dir)
    asyncio.run(run_items(plan, reference.pending(plan), _workers(), FakeArithmeticPRM(), reference,
                          concurrency=3))
    assert len(reference.done) == 24

    store = ResultStore(resumed_dir)

    async def interrupted():
        task_ = asyncio.current_task()
        seen = []

        def stop_after_seven(record):
            seen.append(record)
            if len(seen) == 7:
                task_.cancel()  # what Ctrl-C does to asyncio.run's main task

        await run_items(plan, store.pending(plan), _workers(), FakeArithmeticPRM(), store,
                        concurrency=3, on_record=stop_after_seven)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(interrupted())
    # items that finished in the same engine call as the seventh are recorded too
    saved = len(lines_of(resumed_dir))
    assert 7 <= saved < 24

    again = ResultStore(resumed_dir)
    pending = again.pending(plan)
    assert len(pending) == 24 - saved and not {i.key for i in pending} & set(again.done)
    assert asyncio.run(run_items(plan, pending, _workers(), FakeArithmeticPRM(), again,
                                 concurrency=3)) == 24 - saved
    records = lines_of(resumed_dir)
    keys = [(r["strategy"], r["n"], r["tier"], r["index"]) for r in records]
    assert len(keys) == len(set(keys)) == 24
    assert {k: outcome(r) for k, r in zip(keys, records)} == \
        {k: outcome(r) for k, r in reference.done.items()}
    assert ResultStore(resumed_dir).pending(plan) == []


def test_a_failing_item_stops_the_run_and_keeps_what_was_recorded(tmp_path):
    plan = small_plan(strategies=["majority"], ns=[2])

    question = task.generate("medium", 3, 0)[1].question  # the item ("majority", 2, "medium", 1)

    class Broken(FakeArithmeticPolicy):
        async def complete(self, prefixes, n, params):
            if any(question in TOK.decode(p) for p in prefixes):
                raise RuntimeError("boom")
            return await super().complete(prefixes, n, params)

    store = ResultStore(tmp_path)
    worker = LocalWorker(TokenizingPolicy(Broken(seed=1), TOK))
    from ttc_vllm.jobs.run import ItemFailedError

    with pytest.raises(ItemFailedError, match=r"\('majority', 2, 'medium', 1\) failed on local: RuntimeError: boom"):
        asyncio.run(run_items(plan, plan.items(), [worker], None, store, concurrency=1))
    assert [r["index"] for r in lines_of(tmp_path)] == [0, 1, 2, 0]  # everything before it


KILL_SCRIPT = """
import asyncio, sys
sys.path.insert(0, {tests!r})
from test_jobs import small_plan, TOK
from ttc_vllm.jobs.run import LocalWorker, run_items
from ttc_vllm.jobs.store import ResultStore
from ttc_vllm.jobs.replicas import TokenizingPolicy
from tests.fakes import FakeArithmeticPolicy, FakeArithmeticPRM

class Slow(FakeArithmeticPolicy):
    async def complete(self, prefixes, n, params):
        await asyncio.sleep(0.15)
        return await super().complete(prefixes, n, params)

plan = small_plan()
store = ResultStore(sys.argv[1])
worker = LocalWorker(TokenizingPolicy(Slow(seed=1), TOK))
asyncio.run(run_items(plan, store.pending(plan), [worker], FakeArithmeticPRM(), store, concurrency=1))
"""


def test_a_killed_run_loses_nothing_it_recorded(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(tests=str(ROOT / "tests")), str(tmp_path)],
                            cwd=ROOT)
    results = tmp_path / RESULTS_FILE
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_text().count("\n") >= 4:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    recorded = ResultStore(tmp_path)
    assert 4 <= len(recorded.done) < 24
    plan = small_plan()
    asyncio.run(run_items(plan, recorded.pending(plan), _workers(1), FakeArithmeticPRM(), recorded))
    keys = [(r["strategy"], r["n"], r["tier"], r["index"]) for r in lines_of(tmp_path)]
    assert len(keys) == len(set(keys)) == 24


def test_summary_and_table_by_hand():
    plan = small_plan(strategies=["majority"], ns=[2], problems=tiers_problems(["easy"], 2, 0))
    done = {("majority", 2, "easy", 0): _record(index=0, correct=True, generated_tokens=10, prm_tokens=0),
            ("majority", 2, "easy", 1): _record(index=1, correct=False, generated_tokens=30, prm_tokens=4)}
    [row] = summarize(plan, done)
    assert (row["done"], row["problems"], row["correct"], row["accuracy"]) == (2, 2, 1, 0.5)
    assert (row["generated_tokens_per_problem"], row["prm_tokens_per_problem"]) == (20.0, 2.0)
    table = format_table([row]).splitlines()
    assert table[2].split() == ["majority", "2", "easy", "2/2", "50.0%", "20.0", "2.0"]
    [partial] = summarize(plan, {k: v for k, v in done.items() if k[3] == 1})
    assert (partial["done"], partial["accuracy"]) == (1, 0.0)


# -- CLI ------------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def bad_dataset(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json\n")
    return path


@pytest.mark.parametrize("extra, needle", [
    (["--strategies", "majority,greedy"], "unknown strategy greedy"),
    (["--n", "4,0"], "positive integers"),
    (["--n", "four"], "positive integers"),
    (["--tiers", "easy,extreme"], "unknown tier extreme"),
    (["--dataset", "/definitely/not/here.jsonl"], "not a readable file"),
    (["--dataset", "BAD"], "bad.jsonl:1: not JSON"),
    (["--dataset", "BAD", "--tiers", "easy"], "either --tiers or --dataset"),
    (["--strategies", "beam", "--n", "6"], "beam_width (4) must divide n (6)"),
    (["--strategies", "beam", "--prm-config", "/nope.json"], "cannot read /nope.json"),
    (["--address", "http://127.0.0.1:8265"], "job-submission address"),
    (["--address", "127.0.0.1:PORT"], "cannot reach the Ray cluster"),
    (["--engine-kwargs", "[1]"], "expected a JSON object"),
    (["--controls", "{max_think"], "--controls: not valid JSON"),
    (["--controls", '{"halting": {"signal": "vibes"}}'], "ttc.halting.signal"),
    (["--adaptive", "[4]"], "--adaptive: expected a JSON object"),
    (["--adaptive", '{"consensus": 2}'], "majority n=4: adaptive.consensus"),
    (["--adaptive", '{"waves": [2, 1]}'], "adaptive.waves [2, 1] must sum to n (4)"),
    (["--strategies", "beam", "--adaptive", "{}"], "adaptive applies only to strategies majority, weighted_vote"),
    (["--policy-replicas", "0"], "positive integer"),
])
def test_job_evaluate_bad_arguments_one_line_exit_2(extra, needle, tmp_path, bad_dataset, capsys):
    extra = [str(bad_dataset) if a == "BAD" else a.replace("PORT", str(_closed_port())) for a in extra]
    base = ["job", "evaluate", "--out", str(tmp_path / "out")]
    if "--tiers" not in extra and "--dataset" not in extra:
        base += ["--tiers", "easy", "--problems", "2"]
    start = time.monotonic()
    try:
        code = main(base + extra)
    except SystemExit as e:  # argparse's own errors exit from the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert time.monotonic() - start < 10  # probes fail fast, nothing waits on Ray


def test_job_evaluate_with_everything_done_needs_no_ray_and_rewrites_the_summary(tmp_path, capsys):
    plan = small_plan(strategies=["majority"], ns=[2], problems=tiers_problems(["easy"], 2, 10_000),
                      policy="testbed-policy", prm=None)
    store = ResultStore(tmp_path)
    for item in plan.items():
        store.append(_record(*item.key, correct=item.problem.index == 0, setup=plan.setup(item)))
    code = main(["job", "evaluate", "--tiers", "easy", "--problems", "2", "--strategies", "majority",
                 "--n", "2", "--out", str(tmp_path), "--address", "127.0.0.1:1"])  # never contacted
    out = capsys.readouterr()
    assert code == 2 and "cannot reach" in out.err  # an unreachable address is refused up front
    code = main(["job", "evaluate", "--tiers", "easy", "--problems", "2", "--strategies", "majority",
                 "--n", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "2 already in" in out and "0 to run" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["done"], r["accuracy"]) for r in summary["rows"]] == [(2, 0.5)]
    assert (tmp_path / "accuracy_vs_tokens.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, needle", [
    (["job", "prm-data", "--help"], "--rollouts"),
    (["testbed", "train-prm", "--help"], "--labels"),
])
def test_pass_through_subcommands(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and needle in capsys.readouterr().out


def test_step_delimiter_escapes_reach_the_search_options():
    args = build_parser().parse_args(["job", "evaluate", "--out", "/tmp/x", "--dataset", __file__,
                                      "--step-delimiter", r"\n\n"])
    assert args.step_delimiter == r"\n\n"
    from ttc_vllm.jobs.evaluate import parse_delimiter

    assert parse_delimiter(r"\n\n") == "\n\n" and parse_delimiter("<extra_0>") == "<extra_0>"


def test_address_resolution():
    assert resolve_address(None, {}) == "local"
    assert resolve_address(None, {"RAY_ADDRESS": "http://127.0.0.1:8265"}) == "auto"  # inside `ray job submit`
    assert resolve_address("ray://head:10001", {}) == "ray://head:10001"
    with pytest.raises(ValueError, match="dashboard"):
        resolve_address("http://head:8265", {})


# -- where results go, waiting for resources ----------------------------------------------

def _ray_job_env(job="raysubmit_abc123", **extra):
    """The environment `ray job submit` gives the entrypoint (ray's job_supervisor)."""
    config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"},
              "metadata": {"job_submission_id": job, "job_name": job}}
    return {RAY_JOB_CONFIG_ENV: json.dumps(config), "RAY_ADDRESS": "127.0.0.1:6379", **extra}


def test_ray_job_detection_reads_what_ray_sets():
    pytest.importorskip("ray")
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.dashboard.modules.job.common import JOB_ID_METADATA_KEY

    # the names this installed Ray uses; if Ray renames them, detection must follow
    assert RAY_JOB_CONFIG_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR and JOB_ID_METADATA_KEY == "job_submission_id"
    assert ray_job_id(_ray_job_env()) == "raysubmit_abc123"
    assert ray_job_id({"RAY_ADDRESS": "auto"}) is None  # a cluster address alone is not a job
    assert ray_job_id({RAY_JOB_CONFIG_ENV: "{broken"}) == "(unknown id)"


def test_results_dir_outside_and_inside_a_ray_job(tmp_path):
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    assert results_dir("/data/runs/x", _ray_job_env(), copy) == Path("/data/runs/x")
    assert results_dir("runs/x", {}, tmp_path) == tmp_path / "runs/x"
    assert results_dir("~/runs/x", {}, tmp_path) == Path.home() / "runs/x"
    with pytest.raises(JobError) as e:
        results_dir("runs/x", _ray_job_env(), copy)
    msg = str(e.value)
    assert msg.startswith("--out runs/x is relative") and "raysubmit_abc123" in msg
    assert "temporary copy of --working-dir" in msg and "absolute path" in msg and STORAGE_ENV in msg
    with pytest.raises(JobError, match="a directory Ray chose"):  # no --working-dir: still not the user's
        results_dir("runs/x", _ray_job_env(), tmp_path)
    # a storage root takes relative paths, in a job or not
    assert results_dir("runs/x", _ray_job_env(**{STORAGE_ENV: "/mnt/results"}), copy) == Path("/mnt/results/runs/x")
    assert results_dir("runs/x", {STORAGE_ENV: "/mnt/results"}, tmp_path) == Path("/mnt/results/runs/x")
    with pytest.raises(JobError, match=f"{STORAGE_ENV}='results': must be an absolute path"):
        results_dir("runs/x", {STORAGE_ENV: "results"}, tmp_path)
    with pytest.raises(JobError, match="--out s3://bucket/x: results are written as local files"):
        results_dir("s3://bucket/x", {}, tmp_path)


def _done_store(directory: Path) -> list[str]:
    """A results file holding every item of `job evaluate` over 2 easy problems with majority
    n=2 (so the command needs no Ray), and that command's grid arguments."""
    plan = small_plan(strategies=["majority"], ns=[2], problems=tiers_problems(["easy"], 2, 10_000),
                      policy="testbed-policy", prm=None)
    store = ResultStore(directory)
    for item in plan.items():
        store.append(_record(*item.key, correct=True, setup=plan.setup(item)))
    return ["job", "evaluate", "--tiers", "easy", "--problems", "2", "--strategies", "majority", "--n", "2"]


def test_job_in_a_ray_job_refuses_a_relative_out_and_uses_the_storage_root(tmp_path, monkeypatch, capsys):
    copy = tmp_path / "ray" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    for key, value in _ray_job_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    grid = _done_store(tmp_path / "storage" / "runs" / "x")
    assert main(grid + ["--out", "runs/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ttc-vllm job evaluate: error: --out runs/x is relative") and len(err.splitlines()) == 1
    assert not (copy / "runs").exists()  # nothing written into Ray's copy
    # with a storage root the same command finds (resumes) the results there
    monkeypatch.setenv(STORAGE_ENV, str(tmp_path / "storage"))
    assert main(grid + ["--out", "runs/x"]) == 0
    out = capsys.readouterr().out
    where = tmp_path / "storage" / "runs" / "x"
    assert out.splitlines()[0] == f"results: {where} (rerun with the same --out to resume)"
    assert "2 already in" in out and "0 to run" in out and (where / "summary.json").is_file()
    assert not (copy / "runs").exists()


def test_results_line_names_the_absolute_directory_outside_ray(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for key in (RAY_JOB_CONFIG_ENV, STORAGE_ENV, "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    grid = _done_store(tmp_path / "runs" / "y")
    assert main(grid + ["--out", "runs/y"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"results: {tmp_path / 'runs' / 'y'} (rerun with the same --out to resume)"
    assert out[-1].startswith(f"wrote {tmp_path / 'runs' / 'y' / 'summary.json'}")
    (tmp_path / "a_file").write_text("")
    assert main(grid + ["--out", "a_file/z"]) == 2
    assert "--out a_file/z: cannot create" in capsys.readouterr().err


def test_resource_watch_reports_until_the_cluster_has_the_resources():
    import threading

    from ttc_vllm.jobs.replicas import ResourceWatch

    totals = iter([{"CPU": 8, "GPU": 0}, {"CPU": 8, "GPU": 1}, RuntimeError("GCS busy"),
                   {"CPU": 8, "GPU": 3}])
    messages, done = [], threading.Event()

    def resources():
        value = next(totals)
        if isinstance(value, Exception):
            raise value
        return value

    def report(message):
        messages.append(message)
        if "has the resources" in message:
            done.set()

    groups = [("policy replica(s)", 2, {"num_cpus": 1, "num_gpus": 1}), ("PRM actor(s)", 1, {"num_gpus": 1})]
    with ResourceWatch(groups, timeout_s=900, every_s=0.01, report=report, resources=resources):
        assert done.wait(60)
    waiting = ("waiting for resources: 2 policy replica(s) x 1 + 1 PRM actor(s) x 1 need 3 GPU, "
               "the cluster has {} now; an autoscaler may add nodes")
    assert [m.split(" (waited")[0] for m in messages] == [
        waiting.format(0), waiting.format(1),
        "the cluster has the resources now"]  # the failed query in between said nothing
    assert "--ready-timeout 900 s" in messages[0]
    quiet = []
    with ResourceWatch(groups, 900, every_s=0.01, report=quiet.append, resources=lambda: {"CPU": 4, "GPU": 3}):
        pass
    assert quiet == []  # enough from the start: nothing to say, no thread


@pytest.mark.parametrize("address, fixed", [("local", True), ("auto", False), ("10.0.0.5:6379", False),
                                            ("ray://head:10001", False)])
def test_only_a_ray_the_job_started_is_a_fixed_cluster(address, fixed, tmp_path, monkeypatch, capsys):
    from ttc_vllm.jobs import replicas

    seen = []

    def check_resources(groups, fixed_cluster):
        seen.append((groups, fixed_cluster))
        raise replicas.ReplicaUnavailableError("checked")

    monkeypatch.setattr(replicas, "check_reachable", lambda address, timeout_s=5.0: None)
    monkeypatch.setattr(replicas, "connect", lambda address, num_cpus=None: True)  # "this call ran ray.init"
    monkeypatch.setattr(replicas, "check_resources", check_resources)
    code = main(["job", "evaluate", "--tiers", "easy", "--problems", "1", "--strategies", "majority",
                 "--out", str(tmp_path), "--address", address, "--replica-gpus", "1"])
    assert code == 2 and "checked" in capsys.readouterr().err
    [(groups, fixed_cluster)] = seen
    assert fixed_cluster is fixed and groups == [("policy replica(s)", 1, {"num_cpus": 1.0, "num_gpus": 1.0})]


# -- deploy files ---------------------------------------------------------------------------

def _deploy_yaml_files():
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _strings_and_lists(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings_and_lists(value)
    elif isinstance(node, list):
        yield node
        for value in node:
            yield from _strings_and_lists(value)
    elif isinstance(node, str):
        yield node


def ttc_commands(doc) -> list[list[str]]:
    """Every `ttc-vllm ...` command a YAML document runs: argv lists starting with ttc-vllm,
    and shell strings (segments split at && ; and newlines)."""
    commands = []
    for node in _strings_and_lists(doc):
        if isinstance(node, list):
            if len(node) > 1 and node[0] == "ttc-vllm":  # (a one-item list is a name: depends_on)
                commands.append([str(a) for a in node[1:]])
            continue
        for line in node.replace("&&", "\n").replace(";", "\n").splitlines():
            words = shlex.split(line, comments=True) if "ttc-vllm " in line else []
            if words and words[0] == "ttc-vllm":
                commands.append(words[1:])
    return commands


def _load_all(path):
    yaml = pytest.importorskip("yaml")  # PyYAML comes with ray[default]
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_every_deploy_file_is_valid_yaml():
    files = _deploy_yaml_files()
    names = {p.relative_to(DEPLOY).as_posix() for p in files}
    assert {"kuberay/rayjob-evaluate.yaml", "kubernetes/serve.yaml", "ray-cluster.yaml",
            "docker-compose.yaml", "prometheus.yml"} <= names
    for path in files:
        assert _load_all(path), f"{path} is empty"


def test_deploy_commands_are_accepted_by_the_cli():
    runs = {}
    for path in _deploy_yaml_files():
        for doc in _load_all(path):
            for argv in ttc_commands(doc):
                runs.setdefault(path.relative_to(DEPLOY).as_posix(), []).append(argv)
    assert [a[:2] for a in runs["kuberay/rayjob-evaluate.yaml"]] == [["job", "evaluate"]]
    assert [a[:1] for a in runs["kubernetes/serve.yaml"]] == [["serve"]]
    assert [a[:1] for a in runs["docker-compose.yaml"]] == [["serve"]]
    for argv in (a for commands in runs.values() for a in commands):
        if argv[0] == "serve":
            _check_serve_args(argv[1:])
            continue
        args = build_parser().parse_args(argv)
        assert args.strategies and args.n
        # these run as Ray jobs, whose working directory is temporary: results go to a volume
        assert Path(args.out).is_absolute(), f"--out {args.out} in a Ray job must be absolute"
    rayjob = _load_all(DEPLOY / "kuberay/rayjob-evaluate.yaml")[0]
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu")
               for g in groups for c in g["template"]["spec"]["containers"])


def _check_serve_args(argv):
    """`ttc-vllm serve` takes `vllm serve`'s arguments: parse them with vLLM's own parser."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    assert args.model_tag or args.model


def test_prometheus_and_grafana_point_at_the_compose_services():
    compose = _load_all(DEPLOY / "docker-compose.yaml")[0]
    services = compose["services"]
    prometheus = _load_all(DEPLOY / "prometheus.yml")[0]
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in services, f"prometheus scrapes {host}, not a compose service"
        [serve] = ttc_commands(services[host])
        assert serve[serve.index("--port") + 1] == port
    mounted = [v.split(":")[0] for v in services["prometheus"]["volumes"]]
    assert "./prometheus.yml" in mounted
    datasource = _load_all(DEPLOY / "grafana/datasources.yaml")[0]["datasources"][0]
    host = datasource["url"].split("//")[1].split(":")[0]
    assert host in services
    for volume in services["grafana"]["volumes"]:
        source = (DEPLOY / volume.split(":")[0]).resolve()
        # the dashboards folder is the repository's grafana/ (it may not be checked out yet)
        assert source == ROOT / "grafana" or source.is_file(), f"grafana mounts {source}, which is missing"


def test_image_builds_from_files_that_exist():
    compose = _load_all(DEPLOY / "docker-compose.yaml")[0]
    build = compose["services"]["ttc-vllm"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    dockerfile = context / build["dockerfile"]
    assert context == ROOT and dockerfile.is_file()
    copies = [line.split()[1:-1] for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")]
    sources = [src for srcs in copies for src in srcs]
    assert {"pyproject.toml", "ttc_vllm", "plugins"} <= set(sources)
    assert all((context / src).exists() for src in sources)


def _pip_installs(text: str) -> list[str]:
    """The arguments (requirements, paths) of every `pip install` in a shell text."""
    found = []
    for segment in re.split(r"&&|;|\n|\|\|", text.replace("\\\n", " ")):
        match = re.search(r"\bpip3?\s+install\b(.*)", segment)
        if match:
            try:
                words = shlex.split(match.group(1), comments=True)
            except ValueError:
                words = match.group(1).split()
            found += [w for w in words if not w.startswith("-")]
    return found


def _runtime_env_pip(doc) -> list[str]:
    """The pip requirements of RayJob / RayService runtime environments in a YAML document."""
    import yaml

    found = []
    for node in _strings_and_lists(doc):
        if isinstance(node, str) and re.search(r"^\s*pip\s*:", node, re.M):
            env = yaml.safe_load(node)
            pip = env.get("pip") if isinstance(env, dict) else None
            found += (pip.get("packages", []) if isinstance(pip, dict) else pip) or []
    return found


def ttc_from_an_index(requirements) -> list[str]:
    """The requirements that name the ttc-vllm distribution (so pip would fetch it from a
    package index, which has none), as opposed to a path or a wheel file of this checkout."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    named = []
    for text in requirements:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:  # ".[gpu,ray]", "$(ls dist/*.whl)[gpu]", "/x/y.whl": not names
            continue
        if canonicalize_name(requirement.name) == "ttc-vllm" and not requirement.url:
            named.append(text)
    return named


def test_the_index_check_catches_what_the_manifests_used_to_do():
    assert ttc_from_an_index(_pip_installs(
        'ray stop && python3 -m pip install -U "ttc-vllm[gpu,ray]==0.1.0"')) == ["ttc-vllm[gpu,ray]==0.1.0"]
    assert ttc_from_an_index(_runtime_env_pip({"runtimeEnvYAML": "pip:\n  - ttc_vllm[gpu]\n"})) == ["ttc_vllm[gpu]"]
    assert ttc_from_an_index(_pip_installs('pip install ".[gpu,ray]" "ray[default]==2.60.0"')) == []
    assert ttc_from_an_index(_pip_installs('pip install "$(ls d/ttc_vllm-*.whl | tail -n 1)[gpu,ray]"')) == []


def test_no_manifest_installs_ttc_vllm_from_a_package_index():
    offenders = {}
    for path in _deploy_yaml_files():
        for doc in _load_all(path):
            texts = [n for n in _strings_and_lists(doc) if isinstance(n, str)]
            named = ttc_from_an_index([a for t in texts for a in _pip_installs(t)] + _runtime_env_pip(doc))
            if named:
                offenders[path.name] = named
    named = ttc_from_an_index(_pip_installs((DEPLOY / "Dockerfile").read_text()))
    if named:
        offenders["Dockerfile"] = named
    assert not offenders, f"no package index has ttc-vllm: {offenders}"


def _dockerfile() -> tuple[str, str]:
    """(the image tag the Dockerfile says to build, its RAY_VERSION)."""
    text = (DEPLOY / "Dockerfile").read_text()
    [tag] = re.findall(r"docker build -f deploy/Dockerfile -t (\S+) \.", text)
    [ray_version] = re.findall(r"^ARG RAY_VERSION=(\S+)$", text, re.M)
    return tag, ray_version


def _containers(doc) -> list[dict]:
    if not isinstance(doc, dict):
        return []
    found = []
    for key, value in doc.items():
        if key == "containers" and isinstance(value, list):
            found += value
        elif isinstance(value, (dict, list)):
            for item in value if isinstance(value, list) else [value]:
                found += _containers(item)
    return found


def test_manifests_use_the_image_the_dockerfile_builds_with_its_ray():
    tag, ray_version = _dockerfile()
    version = tag.rsplit(":", 1)[1]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert version == re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    compose = _load_all(DEPLOY / "docker-compose.yaml")[0]
    assert compose["services"]["ttc-vllm"]["image"] == tag  # compose builds and names it
    images = {}
    for path in (DEPLOY / "kubernetes/serve.yaml", DEPLOY / "kuberay/rayjob-evaluate.yaml"):
        for doc in _load_all(path):
            for container in _containers(doc):
                images.setdefault(path.name, []).append(container["image"])
    # every pod that runs ttc-vllm (serving, the Ray head that runs the job, the GPU workers
    # that host the engines) runs that image; a stock Ray image has no ttc-vllm
    assert images["serve.yaml"] == [tag]
    assert images["rayjob-evaluate.yaml"] == [tag, tag]
    rayjob = _load_all(DEPLOY / "kuberay/rayjob-evaluate.yaml")[0]
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
    assert "wget" in (DEPLOY / "Dockerfile").read_text()  # KubeRay's default probes run it
    launcher = _load_all(DEPLOY / "ray-cluster.yaml")[0]
    pins = {r for c in launcher["setup_commands"] for r in _pip_installs(c) if r.startswith("ray[")}
    assert pins == {f"ray[default]=={ray_version}"}, "every node must run the image's Ray"


def test_cluster_launcher_installs_the_wheel_the_readme_says_to_build():
    launcher = _load_all(DEPLOY / "ray-cluster.yaml")[0]
    [target] = [t for t, s in launcher["file_mounts"].items() if s.rstrip("/") == "./dist"]
    wheels = [r for c in launcher["setup_commands"] for r in _pip_installs(c) if "ttc_vllm-" in r]
    # pip names the wheel after the distribution with "_" (ttc_vllm-0.1.0-py3-none-any.whl)
    assert len(wheels) == 1 and f"{target}/ttc_vllm-*.whl" in wheels[0] and wheels[0].endswith("[gpu,ray]")
    readme = (DEPLOY / "README.md").read_text()
    assert "pip wheel . --no-deps -w dist" in readme and "docker build -f deploy/Dockerfile" in readme
    assert "pip wheel . --no-deps -w dist" in (DEPLOY / "ray-cluster.yaml").read_text()


# -- Ray ------------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.engine
@pytest.mark.timeout(600)
def test_testbed_policy_in_a_ray_replica_majority_of_4(tmp_path, capsys):
    """The real thing, small: `ttc-vllm job evaluate` on a local Ray, one replica hosting the
    shipped testbed policy in vLLM, 6 easy problems, majority@4."""
    pytest.importorskip("ray")
    import ray as ray_

    argv = ["job", "evaluate", "--tiers", "easy", "--problems", "6", "--strategies", "majority",
            "--n", "4", "--out", str(tmp_path), "--num-cpus", "2", "--replica-cpus", "1",
            "--engine-kwargs", json.dumps({"kv_cache_memory_bytes": 256 << 20, "max_num_seqs": 64})]
    assert main(argv) == 0
    assert not ray_.is_initialized()  # the job started Ray and shut it down
    out = capsys.readouterr().out
    records = lines_of(tmp_path)
    assert sorted(r["index"] for r in records) == list(range(6))
    assert all(r["worker"] == "replica-0" and r["generated_tokens"] > 0 for r in records)
    summary = json.loads((tmp_path / "summary.json").read_text())
    [row] = summary["rows"]
    assert row["done"] == 6 and row["accuracy"] >= 0.8, out
    assert "majority" in out and "6/6" in out
    # a rerun finds everything done: no engine, no new lines
    assert main(argv) == 0
    assert len(lines_of(tmp_path)) == 6 and "0 to run" in capsys.readouterr().out


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_cli_job_on_local_ray_with_prm_strategies(tmp_path, monkeypatch, capsys):
    """`job evaluate` end to end on a Ray it starts itself, with the policy and the PRM
    swapped for the fakes (the factories are looked up when the actors are built)."""
    ray_ = pytest.importorskip("ray")
    from ttc_vllm.jobs import replicas
    from ttc_vllm.prm import scorers

    def fake_vllm_policy(model, overrides, delimiter):  # local: pickled by value
        from ttc_vllm.jobs.replicas import TokenizingPolicy
        from tests.fakes import FakeArithmeticPolicy
        from ttc_vllm.testbed.tokenizer import load_testbed_tokenizer

        assert model is None and overrides == {"seed": 5}  # what the CLI passes the factory
        return TokenizingPolicy(FakeArithmeticPolicy(seed=1), load_testbed_tokenizer())

    def fake_make_scorer(config):
        from tests.fakes import FakeArithmeticPRM

        assert config.model == "fake-prm"
        return FakeArithmeticPRM()

    monkeypatch.setattr(replicas, "vllm_policy", fake_vllm_policy)
    monkeypatch.setattr(scorers, "make_scorer", fake_make_scorer)
    argv = ["job", "evaluate", "--tiers", "easy,medium", "--problems", "3", "--seed", "0",
            "--strategies", "majority,best_of_n,beam", "--n", "4", "--temperature", "0.8",
            "--out", str(tmp_path), "--num-cpus", "2", "--policy-replicas", "2", "--replica-cpus", "0.5",
            "--prm-actors", "1", "--prm-cpus", "0.5", "--engine-kwargs", '{"seed": 5}',
            "--prm-config", '{"kind": "pooling", "model": "fake-prm"}']
    assert main(argv) == 0
    assert not ray_.is_initialized()
    out = capsys.readouterr().out
    records = lines_of(tmp_path)
    assert len(records) == 18 and {r["worker"] for r in records} == {"replica-0", "replica-1"}
    # the same decisions as the fakes make in this process
    plan = small_plan(strategies=["majority", "best_of_n", "beam"], ns=[4])
    local = ResultStore(tmp_path / "local")
    asyncio.run(run_items(plan, plan.items(), _workers(1), FakeArithmeticPRM(), local))
    got = {(r["strategy"], r["n"], r["tier"], r["index"]): outcome(r) for r in records}
    assert got == {k: outcome(r) for k, r in local.done.items()}
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [(r["strategy"], r["tier"], r["done"]) for r in rows] == [
        (s, t, 3) for s in ("majority", "best_of_n", "beam") for t in ("easy", "medium")]
    assert all(r["prm_tokens_per_problem"] > 0 for r in rows if r["strategy"] != "majority")
    assert "beam" in out and "3/3" in out


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the fake-replica tests (after the engine test, which starts and stops
    its own through the CLI)."""
    ray = pytest.importorskip("ray")
    from ttc_vllm.prm.pool import init_ray

    init_ray(ray, "local", num_cpus=2, include_dashboard=False, log_to_driver=False)   # loopback only
    yield ray
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_fake_replicas_share_the_items_and_resume_after_an_interruption(local_ray, tmp_path):
    from ttc_vllm.jobs.replicas import start_replicas
    from ttc_vllm.prm.pool import PRMPool

    def factory():  # local: pickled by value, the Ray workers need no test module
        from ttc_vllm.jobs.replicas import TokenizingPolicy
        from tests.fakes import FakeArithmeticPolicy
        from ttc_vllm.testbed.tokenizer import load_testbed_tokenizer

        # 20 ms a call, like an engine: calls arriving while one runs queue and merge
        return TokenizingPolicy(FakeArithmeticPolicy(seed=1, delay_s=0.02), load_testbed_tokenizer())

    plan = small_plan()
    replicas = start_replicas(2, factory, actor_options={"num_cpus": 0.5})
    pool = PRMPool(1, FakeArithmeticPRM, actor_options={"num_cpus": 0.5})
    try:
        assert len(set(local_ray.get([h.ready.remote() for h in replicas.handles]))) == 2  # two processes
        store = ResultStore(tmp_path)

        async def interrupted():
            task_ = asyncio.current_task()
            count = 0

            def stop_after_five(record):
                nonlocal count
                count += 1
                if count == 5:
                    task_.cancel()

            await run_items(plan, store.pending(plan), replicas.clients, pool, store, concurrency=2,
                            on_record=stop_after_five)

        with pytest.raises(asyncio.CancelledError):
            asyncio.run(interrupted())
        assert 5 <= len(lines_of(tmp_path)) < 24

        again = ResultStore(tmp_path)
        asyncio.run(run_items(plan, again.pending(plan), replicas.clients, pool, again, concurrency=2))
        records = lines_of(tmp_path)
        keys = [(r["strategy"], r["n"], r["tier"], r["index"]) for r in records]
        assert len(keys) == len(set(keys)) == 24
        workers = [r["worker"] for r in records]
        assert {"replica-0", "replica-1"} == set(workers)
        assert min(workers.count("replica-0"), workers.count("replica-1")) >= 6
        # the remote run decides exactly what an in-process run of the same fakes decides
        local = ResultStore(tmp_path / "local")
        asyncio.run(run_items(plan, plan.items(), _workers(1), FakeArithmeticPRM(), local))
        assert {k: outcome(r) for k, r in zip(keys, records)} == {k: outcome(r) for k, r in local.done.items()}
        stats = replicas.stats()
        assert sum(s["calls"] for s in stats) > sum(s["engine_calls"] for s in stats)  # calls merged
    finally:
        pool.close()
        replicas.close()


@pytest.mark.ray
def test_replica_that_cannot_start_is_a_clear_error(local_ray):
    from ttc_vllm.jobs.replicas import ReplicaUnavailableError, start_replicas

    def broken():
        raise OSError("policy weights not found")

    with pytest.raises(ReplicaUnavailableError, match="policy weights not found"):
        start_replicas(1, broken, actor_options={"num_cpus": 0.5}, max_restarts=0, ready_timeout_s=60)


@pytest.mark.ray
def test_local_cluster_too_small_for_the_replicas_is_refused(local_ray):
    from ttc_vllm.jobs.replicas import ReplicaUnavailableError, check_resources

    policy = ("policy replica(s)", 1, {"num_cpus": 1, "num_gpus": 0})
    assert check_resources([policy, ("PRM actor(s)", 1, {"num_cpus": 1})], fixed_cluster=True) is None
    with pytest.raises(ReplicaUnavailableError,
                       match=r"1 policy replica\(s\) x 1 \+ 2 PRM actor\(s\) x 1 need 3 CPU, the cluster has 2"):
        check_resources([policy, ("PRM actor(s)", 2, {"num_cpus": 1})], fixed_cluster=True)
    with pytest.raises(ReplicaUnavailableError, match="need 1 GPU, the cluster has 0"):
        check_resources([("policy replica(s)", 1, {"num_cpus": 0.5, "num_gpus": 1})], fixed_cluster=True)
    assert "autoscaler" in check_resources([("policy replica(s)", 3, {"num_cpus": 1})], fixed_cluster=False)


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_job_on_a_cluster_it_joined_waits_for_gpus_instead_of_refusing(local_ray, tmp_path, capsys):
    """A Ray this job did not start (here the test's, joined with --address auto) may grow: a
    replica that needs a GPU the cluster lacks is requested and waited for, with a message,
    until --ready-timeout -- not refused at once as on a local Ray the job starts itself."""
    start = time.monotonic()
    code = main(["job", "evaluate", "--tiers", "easy", "--problems", "1", "--strategies", "majority",
                 "--n", "2", "--out", str(tmp_path), "--address", "auto", "--replica-gpus", "1",
                 "--replica-cpus", "0.5", "--ready-timeout", "4"])
    waited = time.monotonic() - start
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "waiting for resources: 1 policy replica(s) x 1 need 1 GPU, the cluster has 0 now; an " \
           "autoscaler may add nodes" in captured.out
    assert "policy replicas not ready after 4s" in captured.err
    assert waited >= 4  # it waited the whole timeout (a lower bound: the timeout cannot end early)
    assert local_ray.is_initialized()  # not the job's Ray: left running


STOP_SCRIPT = """
import asyncio, os, sys

from ttc_vllm.jobs import replicas

HANG_AFTER = int(os.environ["HANG_AFTER"])  # engine calls answered before the policy hangs (-1: never)


def fake_vllm_policy(model, overrides, delimiter):  # in __main__: pickled by value with HANG_AFTER
    from ttc_vllm.jobs.replicas import TokenizingPolicy
    from tests.fakes import FakeArithmeticPolicy
    from ttc_vllm.testbed.tokenizer import load_testbed_tokenizer

    class Hanging(FakeArithmeticPolicy):
        calls = 0

        async def complete(self, prefixes, n, params):
            Hanging.calls += 1
            if 0 <= HANG_AFTER < Hanging.calls:
                await asyncio.Event().wait()  # never answers: only a stop ends the run
            return await super().complete(prefixes, n, params)

    return TokenizingPolicy(Hanging(seed=1), load_testbed_tokenizer())


replicas.vllm_policy = fake_vllm_policy
from ttc_vllm.cli import main

sys.exit(main(sys.argv[1:]))
"""


def _run_job(argv, hang_after: int, logs: Path) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HANG_AFTER": str(hang_after)}
    env.pop("RAY_ADDRESS", None)
    # its own session, like a Ray job's entrypoint: the failure guard can end its whole group
    return subprocess.Popen([sys.executable, "-c", STOP_SCRIPT, *argv], cwd=ROOT, env=env,
                            stdout=open(logs / "out", "w"), stderr=open(logs / "err", "w"),
                            start_new_session=True)


def _reap(proc: subprocess.Popen, timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_sigterm_stops_the_job_with_what_is_left_and_a_rerun_resumes(tmp_path):
    """What `ray job stop` does to the entrypoint: SIGTERM once items are recorded. The job
    says how many are left and exits 143; the same command then runs only those."""
    out = tmp_path / "out"
    argv = ["job", "evaluate", "--tiers", "easy", "--problems", "5", "--seed", "0", "--strategies",
            "majority", "--n", "2", "--out", str(out), "--num-cpus", "1", "--replica-cpus", "0.5",
            "--concurrency", "1"]
    proc = _run_job(argv, hang_after=2, logs=tmp_path / "first")
    results = out / RESULTS_FILE
    try:
        deadline = time.monotonic() + 300  # a failure guard only: the wait is for the record
        while proc.poll() is None and time.monotonic() < deadline:
            if results.exists() and results.read_text().count("\n") >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "first" / "err").read_text()[-3000:]
        assert results.exists(), "no record before the deadline"
        proc.send_signal(signal.SIGTERM)
        code = _reap(proc, 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    err = (tmp_path / "first" / "err").read_text()
    stdout = (tmp_path / "first" / "out").read_text()
    assert code == 128 + signal.SIGTERM, err[-3000:]
    done = len(lines_of(out))
    assert 1 <= done < 5  # the policy hangs after 2 calls: the run could not have finished
    assert f"stopped (SIGTERM): {done} of 5 items done, {5 - done} left; rerun the same command " \
           "to resume" in err, err[-3000:]
    assert stdout.splitlines()[0] == f"results: {out} (rerun with the same --out to resume)"

    proc = _run_job(argv, hang_after=-1, logs=tmp_path / "second")
    code = _reap(proc, 300)
    stdout = (tmp_path / "second" / "out").read_text()
    assert code == 0, (tmp_path / "second" / "err").read_text()[-3000:]
    assert f"{done} already in {results}, {5 - done} to run" in stdout
    keys = [(r["strategy"], r["n"], r["tier"], r["index"]) for r in lines_of(out)]
    assert len(keys) == len(set(keys)) == 5
