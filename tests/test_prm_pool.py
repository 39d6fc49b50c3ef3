import asyncio
import functools
import os
import socket
import time
from pathlib import Path

import pytest

from ttc_vllm.search import SearchOptions, StepParams, Trace, run_search
from tests.fakes import FakeArithmeticPolicy, FakeArithmeticPRM, prompt_ids
from ttc_vllm.testbed import task

ray = pytest.importorskip("ray")
from ttc_vllm.prm.pool import PRMPool, PRMPoolFullError, PRMUnavailableError, init_ray  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

SMALL = {"num_cpus": 0.5}  # two actors plus a restart fit in num_cpus=2


@pytest.fixture(scope="module")
def local_ray():
    init_ray(ray, "local", include_dashboard=False, num_cpus=2, log_to_driver=False)  # on loopback
    yield
    ray.shutdown()


def _slow_prm(delay_s):
    return functools.partial(FakeArithmeticPRM, delay_s=delay_s)


def _gated_prm(gate: Path):
    """A FakeArithmeticPRM whose every batch, once started, waits until the file `gate/open`
    exists, leaving `gate/started-<pid>-<k>` behind: the test can act while batches are in
    flight, however slow the machine."""
    class GatedPRM:  # local: pickled by value, so the Ray worker needs no test module
        def __init__(self):
            self.prm = FakeArithmeticPRM()
            self.batches = 0

        async def score(self, traces):
            self.batches += 1
            (gate / f"started-{os.getpid()}-{self.batches}").touch()
            while not (gate / "open").exists():
                await asyncio.sleep(0.01)
            return [self.prm.score_trace(t) for t in traces]

    return GatedPRM


async def _until_every_actor_holds_a_batch(gate: Path, actors: int, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while len({p.name.split("-")[1] for p in gate.glob("started-*")}) < actors:
        assert time.monotonic() < deadline, f"not every actor started a batch: {list(gate.iterdir())}"
        await asyncio.sleep(0.01)


def _traces(count):
    """Traces of different problems and lengths (1-4 steps), so that a caller handed
    another caller's scores would notice."""
    policy = FakeArithmeticPolicy(seed=5)
    problems = task.generate("medium", count, seed=2)
    prompts = [prompt_ids(p) for p in problems]
    done = asyncio.run(policy.complete(prompts, 1, StepParams(max_tokens=512)))
    return [Trace(tuple(p), steps[:1 + i % 4]) for i, (p, [steps]) in enumerate(zip(prompts, done))]


def _expected(traces):
    prm = FakeArithmeticPRM()
    return [prm.score_trace(t) for t in traces]


async def _score_each(pool, traces):
    return await asyncio.gather(*(pool.score([t]) for t in traces))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_fails_fast(monkeypatch):
    """Refused before ray.init, which would retry for minutes: the event, not a stopwatch
    that a busy machine could run past."""
    import ray

    def no_init(*args, **kwargs):
        raise AssertionError("ray.init was called for an unreachable address")

    monkeypatch.setattr(ray, "init", no_init)
    with pytest.raises(PRMUnavailableError, match="cannot reach the Ray cluster"):
        PRMPool(1, FakeArithmeticPRM, address=f"127.0.0.1:{_closed_port()}", connect_timeout_s=2)


def test_requests_are_batched_and_answered_in_order(local_ray):
    traces = _traces(12)
    with PRMPool(2, _slow_prm(0.2), max_batch=4, max_inflight_per_actor=1,
                 actor_options=SMALL) as pool:
        results = asyncio.run(_score_each(pool, traces))
        assert [r[0] for r in results] == _expected(traces)
        # 12 one-trace calls arrive together: three full batches, not twelve calls.
        assert (pool.stats.batches, pool.stats.largest_batch) == (3, 4)
        assert (pool.stats.requests, pool.stats.traces, pool.stats.retries) == (12, 12, 0)


def test_a_call_larger_than_max_batch_goes_alone(local_ray):
    traces = _traces(6)
    with PRMPool(1, FakeArithmeticPRM, max_batch=4, actor_options=SMALL) as pool:
        assert asyncio.run(pool.score(traces)) == _expected(traces)
        assert pool.stats.largest_batch == 6


def test_a_killed_actor_is_restarted_and_its_batch_retried(local_ray, tmp_path):
    traces = _traces(8)

    async def run(pool):
        pending = asyncio.gather(*(pool.score([t]) for t in traces))
        # Both actors hold a batch that cannot finish before the gate opens: actor 0 dies
        # with its batch in flight, whatever the machine's speed.
        await _until_every_actor_holds_a_batch(tmp_path, 2)
        ray.kill(pool.actors[0], no_restart=False)
        (tmp_path / "open").touch()
        return await pending

    with PRMPool(2, _gated_prm(tmp_path), max_batch=2, max_restarts=2, max_task_retries=2,
                 max_inflight_per_actor=1, actor_options=SMALL) as pool:
        pid_before = ray.get(pool.actors[0].ready.remote())
        results = asyncio.run(run(pool))
        assert ray.get(pool.actors[0].ready.remote()) != pid_before  # a new process
        assert [r[0] for r in results] == _expected(traces)
        assert pool.stats.traces == 8
        # the pool still has both actors and keeps serving
        assert pool.check() == 2
        assert asyncio.run(pool.score(traces[:1])) == _expected(traces[:1])


def test_a_batch_moves_to_another_actor_when_its_actor_is_gone_for_good(local_ray, tmp_path):
    traces = _traces(8)

    async def run(pool):
        pending = asyncio.gather(*(pool.score([t]) for t in traces))
        await _until_every_actor_holds_a_batch(tmp_path, 2)  # as above: actor 0 dies mid-batch
        ray.kill(pool.actors[0], no_restart=False)  # max_restarts=0: it stays dead
        (tmp_path / "open").touch()
        return await pending

    with PRMPool(2, _gated_prm(tmp_path), max_batch=2, max_restarts=0, max_task_retries=1,
                 max_inflight_per_actor=1, actor_options=SMALL) as pool:
        results = asyncio.run(run(pool))
        assert [r[0] for r in results] == _expected(traces)
        # exactly the one batch actor 0 held was retried (on actor 1); actor 0 got no other,
        # since it held its one slot until it died and is never chosen after failing
        assert (pool.stats.retries, pool.stats.actors_lost, pool.live_actors) == (1, 1, 1)


def test_all_actors_dead_is_a_clear_error(local_ray):
    traces = _traces(2)
    pool = PRMPool(2, FakeArithmeticPRM, max_restarts=0, max_task_retries=1, actor_options=SMALL)
    try:
        for actor in pool.actors:
            ray.kill(actor, no_restart=True)
        with pytest.raises(PRMUnavailableError):
            asyncio.run(pool.score(traces))
        with pytest.raises(PRMUnavailableError, match="dead"):
            asyncio.run(pool.score(traces))
    finally:
        pool.close()


def test_scorer_that_cannot_start_is_a_clear_error(local_ray):
    def broken():
        raise OSError("PRM weights not found")

    with pytest.raises(PRMUnavailableError, match="PRM weights not found"):
        PRMPool(1, broken, max_restarts=0, actor_options=SMALL, ready_timeout_s=60)


def test_full_queue_rejects_with_a_clear_error(local_ray):
    traces = _traces(3)

    async def run(pool):
        return await asyncio.gather(*(pool.score([t]) for t in traces), return_exceptions=True)

    with PRMPool(1, _slow_prm(0.2), max_queue=2, actor_options=SMALL) as pool:
        results = asyncio.run(run(pool))
        assert isinstance(results[2], PRMPoolFullError) and "max_queue=2" in str(results[2])
        assert [r[0] for r in results[:2]] == _expected(traces[:2])


def test_search_runs_on_the_pool(local_ray):
    problem = task.generate("hard", 1, seed=1)[0]
    opts = SearchOptions(strategy="beam", n=8, beam_width=4)
    with PRMPool(2, FakeArithmeticPRM, actor_options=SMALL) as pool:
        via_pool = asyncio.run(run_search(prompt_ids(problem), FakeArithmeticPolicy(seed=0), pool,
                                          opts, task.extract_answer))
    direct = asyncio.run(run_search(prompt_ids(problem), FakeArithmeticPolicy(seed=0),
                                    FakeArithmeticPRM(), opts, task.extract_answer))
    assert via_pool.answer == direct.answer == str(problem.answer)
    assert via_pool.chosen.trace == direct.chosen.trace
    assert via_pool.accounting.prm_traces == direct.accounting.prm_traces


def test_scorer_errors_reach_the_caller_without_retries(local_ray):
    class FailingPRM:  # local: pickled by value, so the Ray worker needs no test module
        async def score(self, traces):
            raise ValueError("trace too long for the PRM")

    with PRMPool(1, FailingPRM, actor_options=SMALL) as pool:
        with pytest.raises(ValueError, match="trace too long"):
            asyncio.run(pool.score(_traces(1)))
        assert (pool.stats.retries, pool.live_actors) == (0, 1)
