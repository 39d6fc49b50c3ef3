"""Running a job's items: each item's search and its record, items spread over workers with
every record stored as soon as it is made, and the run on Ray (policy replicas from
`ttc_vllm.jobs.replicas`, a `PRMPool` for PRM strategies) that a stop signal ends cleanly.

Search runs in this process (the driver) over the workers; items are handed to them from one
queue, `concurrency` in flight per worker.

Stopping (`StopSignals`): SIGTERM (`ray job stop`, `kubectl delete`, `docker stop`) and
SIGINT end the run like Ctrl-C: the items in flight are dropped, every recorded one is
kept, and a line says how many are left before the engines are shut down (Ray kills a
stopped job a few seconds after SIGTERM).
"""
from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any, Callable, Sequence

from ttc_vllm.jobs.plan import Item, Plan
from ttc_vllm.jobs.problems import normalise_answer
from ttc_vllm.jobs.store import ResultStore
from ttc_vllm.search import run_search


class ItemFailedError(RuntimeError):
    """An item raised; the items recorded before it are kept."""


class LocalWorker:
    """A policy in this process as a worker (tests, and anything not on Ray): a
    StepGenerator plus `encode(text, chat)`, like replicas.ReplicaClient."""

    def __init__(self, policy, name: str = "local"):
        self.policy = policy
        self.name = name

    async def encode(self, text: str, chat: bool = False) -> list[int]:
        return self.policy.encode(text, chat)

    async def generate_steps(self, prefixes, n, params):
        return await self.policy.generate_steps(prefixes, n, params)

    async def complete(self, prefixes, n, params):
        return await self.policy.complete(prefixes, n, params)


async def evaluate_item(plan: Plan, item: Item, worker, scorer,
                        prompt_ids: dict[tuple[str, bool], list[int]]) -> dict[str, Any]:
    """Run one item's search on `worker`; the record to store."""
    cache_key = (item.problem.prompt, plan.chat)
    ids = prompt_ids.get(cache_key)
    if ids is None:
        ids = prompt_ids[cache_key] = list(await worker.encode(item.problem.prompt, plan.chat))
    options = plan.options(item.strategy, item.n)
    result = await run_search(ids, worker, scorer if options.needs_scorer else None, options,
                              plan.extract_answer(), controls=plan.sample_controls)
    answer = None if result.answer is None else normalise_answer(result.answer)
    a = result.accounting
    strategy, n, tier, index = item.key
    return {
        "strategy": strategy, "n": n, "tier": tier, "index": index,
        "answer": answer, "expected": item.problem.answer, "correct": answer == item.problem.answer,
        "generated_tokens": a.generated_tokens, "prompt_tokens": a.prompt_tokens,
        "cached_prompt_tokens": a.cached_prompt_tokens, "generator_calls": a.generator_calls,
        "nodes_expanded": a.nodes_expanded, "prm_traces": a.prm_traces, "prm_tokens": a.prm_tokens,
        "wall_time_s": round(a.wall_time_s, 4), "worker": worker.name,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "text": result.text, "setup": plan.setup(item),
        "candidates": candidate_records(result.candidates),
    }


def candidate_records(candidates) -> list[dict[str, Any]]:
    """Each final candidate's answer, PRM step scores (None unscored) and generated tokens:
    what any decision rule needs, so rules (majority, weighted vote, best-of-N) and step
    aggregations can be compared offline on the very same traces."""
    return [{
        "answer": None if c.answer is None else normalise_answer(c.answer),
        "step_scores": None if c.step_scores is None else [round(x, 5) for x in c.step_scores],
        "steps": len(c.trace.steps),
        "tokens": sum(step.generated_tokens for step in c.trace.steps),
    } for c in candidates]


async def run_items(plan: Plan, items: Sequence[Item], workers: Sequence[Any], scorer,
                    store: ResultStore, concurrency: int = 8,
                    on_record: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Evaluate `items` over `workers` (`concurrency` items in flight on each, taken from
    one queue so that faster workers take more) and append each record to `store` as soon
    as it is done. Returns the number recorded. The first failing item cancels the rest and
    raises ItemFailedError; cancelling the call (Ctrl-C) keeps everything recorded so far."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not workers:
        raise ValueError("no workers")
    queue: asyncio.Queue[Item] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    prompt_ids: dict[tuple[str, bool], list[int]] = {}
    recorded = 0

    async def lane(worker) -> None:
        nonlocal recorded
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                record = await evaluate_item(plan, item, worker, scorer, prompt_ids)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                raise ItemFailedError(f"item {item.key} failed on {worker.name}: "
                                      f"{type(e).__name__}: {e}") from e
            store.append(record)
            recorded += 1
            if on_record is not None:
                on_record(record)

    lanes = [asyncio.create_task(lane(w)) for w in workers for _ in range(concurrency)]
    try:
        done, _ = await asyncio.wait(lanes, return_when=asyncio.FIRST_EXCEPTION)
        for task_ in done:
            if task_.exception() is not None:
                raise task_.exception()
    finally:
        for task_ in lanes:
            task_.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
    return recorded


# -- the run on Ray, and stopping -----------------------------------------------------------

class Progress:
    """on_record of run_items: a line of items done and their rate, at most every `every_s`."""

    def __init__(self, total: int, before: int, every_s: float = 10.0):
        self.total, self.count, self.before = total, before, before
        self.every_s = every_s
        self.started = self.last = time.monotonic()

    def __call__(self, record: dict[str, Any]) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every_s or self.count == self.total:
            self.last = now
            rate = (self.count - self.before) / max(now - self.started, 1e-9) * 60
            print(f"[{self.count}/{self.total}] items done ({rate:.1f}/min)", flush=True)


class StopSignals:
    """SIGTERM and SIGINT while a job runs end it the way Ctrl-C does (KeyboardInterrupt),
    remembering which signal came (`signum`).

    `arm()` installs the handlers (again after `ray.init`, which puts its own SIGTERM handler
    in place: sys.exit). Outside an event loop the handler raises at once; Ray's blocking
    calls pass the interrupt through as KeyboardInterrupt. `guard(coro)` runs a coroutine
    whose task a signal cancels through the loop (add_signal_handler wakes the loop even when
    another thread took the signal), then raises KeyboardInterrupt once the coroutine has
    unwound. Leaving the context restores the handlers found on entry. Off the main thread
    (where Python allows no handlers) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._saved: dict[int, Any] = {}
        self.active = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> "StopSignals":
        if self.active:
            self._saved = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
            self.arm()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    def arm(self) -> None:
        if self.active:
            for sig in self.SIGNALS:
                signal.signal(sig, self._raise)

    def _raise(self, signum, frame) -> None:
        self.signum = self.signum or signum
        raise KeyboardInterrupt(signal.Signals(signum).name)

    async def guard(self, coro):
        if not self.active:
            return await coro
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def cancel(signum: int) -> None:
            self.signum = self.signum or signum
            task.cancel()

        for sig in self.SIGNALS:
            loop.add_signal_handler(sig, cancel, sig)
        try:
            return await coro
        except asyncio.CancelledError:
            if self.signum is not None:
                raise KeyboardInterrupt(self.name) from None
            raise
        finally:
            for sig in self.SIGNALS:
                loop.remove_signal_handler(sig)  # resets to SIG_DFL: arm again
            self.arm()


def run_on_ray(args, plan: Plan, prm_config, overrides, address: str, store: ResultStore,
                pending: list[Item], progress: Progress, stop: StopSignals,
                on_stop: Callable[[], None]) -> None:
    """Run `pending` on Ray at `address` (started here when "local"): `args.policy_replicas`
    policy replicas and, when a pending strategy needs one, a PRMPool of `args.prm_actors`,
    with the parsed `job evaluate` resource flags; every record goes to `store`. A stop
    signal calls `on_stop` before the engines are shut down and raises KeyboardInterrupt;
    a failing item raises ItemFailedError."""
    import contextlib
    import functools

    from ttc_vllm.jobs import replicas as rp

    owns_ray = rp.connect(address, num_cpus=args.num_cpus)
    stop.arm()  # ray.init replaced the SIGTERM handler
    replicas = pool = None
    try:
        replica_options = {"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus}
        prm_options = {"num_cpus": args.prm_cpus, "num_gpus": args.prm_gpus}
        needs_prm = any(plan.options(i.strategy, i.n).needs_scorer for i in pending)
        groups = [("policy replica(s)", args.policy_replicas, replica_options)]
        if needs_prm:
            groups.append(("PRM actor(s)", args.prm_actors, prm_options))
        # Only a Ray this job started itself cannot grow; a joined cluster may autoscale, so
        # there the actors wait (up to --ready-timeout) and the job says what is missing.
        fixed = owns_ray and address == "local"
        rp.check_resources(groups, fixed_cluster=fixed)
        waiting = contextlib.nullcontext() if fixed else rp.ResourceWatch(groups, args.ready_timeout)
        with waiting:
            print(f"starting {args.policy_replicas} policy replica(s) {replica_options}", flush=True)
            replicas = rp.start_replicas(
                args.policy_replicas,
                # the policy splits steps where the searches do
                functools.partial(rp.vllm_policy, args.policy, overrides, plan.search.get("step_delimiter")),
                actor_options=replica_options, ready_timeout_s=args.ready_timeout)
            scorer = None
            if needs_prm:
                from ttc_vllm.prm.pool import PRMPool
                from ttc_vllm.prm.scorers import make_scorer

                print(f"starting {args.prm_actors} PRM actor(s) {prm_options}", flush=True)
                # every search in flight may wait on the PRM at once: never reject them as "full"
                in_flight = args.policy_replicas * args.concurrency
                pool = scorer = PRMPool(args.prm_actors, functools.partial(make_scorer, prm_config),
                                        max_batch=64, max_queue=max(256, 2 * in_flight),
                                        ready_timeout_s=args.ready_timeout, actor_options=prm_options)
        asyncio.run(stop.guard(run_items(plan, pending, replicas.clients, scorer, store,
                                         concurrency=args.concurrency, on_record=progress)))
    except KeyboardInterrupt:
        on_stop()  # before the cleanup below: `ray job stop` SIGKILLs a few seconds after SIGTERM
        raise
    finally:
        if pool is not None:
            pool.close()
        if replicas is not None:
            # after a stop, do not wait long for the engines: the job is about to be killed
            replicas.close(timeout_s=2.0 if stop.signum else 30.0)
        if owns_ray:
            import ray

            ray.shutdown()
