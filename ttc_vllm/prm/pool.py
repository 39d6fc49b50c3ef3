"""A pool of Ray actors hosting PRM scorers, usable by search as a StepScorer.

Each actor builds its scorer with `scorer_factory()` (in production a vLLM pooling engine
on the PRM, in tests a fake) and scores whole batches. The pool, living in the caller's
event loop, merges concurrent `score` calls -- typically many searches in flight -- into
batches of up to `max_batch` traces (waiting at most `batch_delay_s` for a batch to fill),
sends each batch to the least loaded live actor, and hands every caller its own slice back.

Failure handling, in layers:
- Ray restarts a dead actor (`max_restarts`) and resubmits its in-flight calls to the
  restarted one (`max_task_retries`); callers notice nothing.
- If a call still fails because the actor is gone or silent, the pool retries the batch on
  another live actor (up to `max_task_retries` times) while it probes the failed one; an
  actor that does not answer the probe is dropped.
- With no live actor left, or when a batch exhausts its retries, callers get
  PRMUnavailableError. Scorer exceptions (bugs, bad input) are not retried: they reach the
  caller as Ray's RayTaskError.
- At most `max_queue` calls may wait; beyond that `score` raises PRMPoolFullError at once
  (backpressure the caller can turn into HTTP 503).

Ray is imported only when a pool is built, so the pure search package never needs it.

A Ray head this module starts (`init_ray`, shared with the batch replicas) listens on
loopback only: its GCS, raylet (node and object manager), dashboard agent, runtime-env
agent, metrics exporters and every worker/actor bind 127.0.0.1, so a serving process opens
no Ray port to the network. `TTC_VLLM_RAY_HOST=<this machine's address>` opts into Ray's
own behaviour instead (every interface, that address advertised), for a head other nodes
must join. Joining an existing cluster by address is left to that cluster's configuration.
"""
from __future__ import annotations

import asyncio
import inspect
import ipaddress
import os
import socket
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ttc_vllm.ray_actors import import_ray, wait_ready
from ttc_vllm.search.protocols import Trace

ALIVE, PROBING, DEAD = "alive", "probing", "dead"
RAY_HOST_ENV = "TTC_VLLM_RAY_HOST"
LOOPBACK = "127.0.0.1"


class PRMUnavailableError(RuntimeError):
    """No PRM actor can serve: unreachable cluster, actors failed to start or all died."""


class PRMPoolFullError(RuntimeError):
    """Too many score calls are waiting (max_queue)."""


@dataclass
class PoolStats:
    requests: int = 0  # score() calls served
    traces: int = 0  # traces scored
    batches: int = 0  # batches sent (retries not counted)
    largest_batch: int = 0  # traces in the largest batch sent
    retries: int = 0  # batch attempts that failed on an actor and were sent again
    actors_lost: int = 0  # actors dropped after failing a probe


class ScorerHost:
    """The actor body: one scorer, scoring batches of traces."""

    def __init__(self, scorer_factory: Callable[[], Any]):
        self._scorer = scorer_factory()

    def ready(self) -> int:
        return os.getpid()

    async def score(self, traces: Sequence[Trace]) -> list[list[float]]:
        result = self._scorer.score(traces)
        if inspect.isawaitable(result):
            result = await result
        return [[float(s) for s in scores] for scores in result]


@dataclass
class _Request:
    traces: list[Trace]
    future: asyncio.Future


def _import_ray():
    return import_ray("the PRM pool")


def ray_host(environ: dict[str, str] | None = None) -> str:
    """The node address of a Ray head this process starts: TTC_VLLM_RAY_HOST, else (and for
    any loopback spelling) 127.0.0.1."""
    environ = os.environ if environ is None else environ
    host = environ.get(RAY_HOST_ENV, "").strip()
    if host.lower() in ("", "localhost"):
        return LOOPBACK
    try:
        if ipaddress.ip_address(host).is_loopback:
            return LOOPBACK  # Ray's servers go loopback-only for exactly "127.0.0.1"
    except ValueError:
        pass  # a host name: Ray resolves it
    return host


def init_ray(ray, address: str | None, **init_kwargs) -> None:
    """`ray.init(address=address, **init_kwargs)`, except that None / "local" start a private
    head listening on `ray_host()` -- loopback unless TTC_VLLM_RAY_HOST says otherwise.

    Ray binds its gRPC servers to 127.0.0.1 only when the node's address is exactly that, but
    `ray.init(_node_ip_address="127.0.0.1")` swaps a loopback address for the machine's
    routable one on Linux (services.resolve_ip_for_localhost), so every port would listen on
    0.0.0.0 / ::. Ray keeps the loopback address when ray_constants.ENABLE_RAY_CLUSTER is off
    (its single-machine mode, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); the constant is read once
    at import, so it is switched off around this call only. The node address is checked
    afterwards: a Ray that ignored the switch is shut down rather than left listening."""
    if address not in (None, "local"):
        ray.init(address=address, **init_kwargs)
        return
    host = ray_host()
    init_kwargs["_node_ip_address"] = host
    if host != LOOPBACK:
        ray.init(address="local", **init_kwargs)
        return
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", **init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"Ray {ray.__version__} started on {node_ip}, not loopback, so it "
                           f"would listen on every interface; set {RAY_HOST_ENV}={node_ip} to "
                           "accept that")


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast on an unreachable host:port (ray.init would hang for minutes)."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms: leave them to Ray
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise PRMUnavailableError(f"cannot reach the Ray cluster at {address!r}: {e}") from e


class PRMPool:
    """A StepScorer backed by `num_actors` Ray actors (see module doc).

    address: None or "local" starts an in-process local Ray instance on loopback (`init_ray`)
    unless Ray is already initialised; "host:port", "ray://host:port" or "auto" connect to an
    existing cluster (host:port addresses are checked to be reachable first, even if Ray is
    initialised).
    actor_options go to `.options()` of each actor (e.g. {"num_gpus": 1}). The constructor
    blocks until every actor has built its scorer. Use the pool from one event loop at a
    time (the dispatcher moves to the loop of the latest caller).
    """

    def __init__(self, num_actors: int, scorer_factory: Callable[[], Any], max_batch: int = 32,
                 max_queue: int = 256, max_restarts: int = 2, max_task_retries: int = 2,
                 address: str | None = None, *, batch_delay_s: float = 0.005,
                 max_inflight_per_actor: int = 2, ready_timeout_s: float = 120.0,
                 call_timeout_s: float = 300.0, connect_timeout_s: float = 5.0,
                 actor_options: dict | None = None):
        for name, value, low in [("num_actors", num_actors, 1), ("max_batch", max_batch, 1),
                                 ("max_queue", max_queue, 1), ("max_restarts", max_restarts, 0),
                                 ("max_task_retries", max_task_retries, 0),
                                 ("max_inflight_per_actor", max_inflight_per_actor, 1)]:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_task_retries = max_task_retries
        self.batch_delay_s = batch_delay_s
        self.max_inflight_per_actor = max_inflight_per_actor
        self.ready_timeout_s = ready_timeout_s
        self.call_timeout_s = call_timeout_s
        self.stats = PoolStats()

        ray = self._ray = _import_ray()
        self._owns_ray = False
        if address not in (None, "local"):
            _check_reachable(address, connect_timeout_s)
        if not ray.is_initialized():
            try:
                init_ray(ray, address, include_dashboard=False)
            except Exception as e:
                raise PRMUnavailableError(f"cannot start or join Ray at {address!r}: {e}") from e
            self._owns_ray = True

        host = ray.remote(max_restarts=max_restarts, max_task_retries=max_task_retries)(ScorerHost)
        self.actors = [host.options(**(actor_options or {})).remote(scorer_factory)
                       for _ in range(num_actors)]
        self._state = [ALIVE] * num_actors
        self._inflight = [0] * num_actors
        self._probes: dict[int, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._wait_ready()

    # -- lifecycle ----------------------------------------------------------------------
    def _wait_ready(self) -> None:
        wait_ready(self._ray, self.actors, self.ready_timeout_s, "PRM actors", PRMUnavailableError,
                   self.close)

    def check(self, timeout_s: float = 10.0) -> int:
        """Ping every actor not known dead (blocking; for startup and health checks):
        the number that answered. Raises PRMUnavailableError if none did."""
        ray = self._ray
        answered = 0
        for i, actor in enumerate(self.actors):
            if self._state[i] == DEAD:
                continue
            try:
                ray.get(actor.ready.remote(), timeout=timeout_s)
                answered += 1
            except ray.exceptions.RayActorError:
                self._state[i] = DEAD
                self.stats.actors_lost += 1
            except ray.exceptions.GetTimeoutError:
                pass
        if not answered:
            raise PRMUnavailableError(
                f"no PRM actor answered within {timeout_s}s ({self.live_actors} not known dead)")
        return answered

    def close(self) -> None:
        """Kill the actors (and shut down Ray if this pool started it)."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._dispatcher.cancel()
            self._fail_queue(PRMUnavailableError("the PRM pool was closed"))
        for actor in self.actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:
                pass
        if self._owns_ray:
            self._ray.shutdown()

    def __enter__(self) -> "PRMPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def live_actors(self) -> int:
        return sum(s != DEAD for s in self._state)

    # -- the StepScorer protocol ----------------------------------------------------------
    async def score(self, traces: Sequence[Trace]) -> list[list[float]]:
        traces = list(traces)
        if not traces:
            return []
        self._bind_loop()
        if self._closed:
            raise PRMUnavailableError("the PRM pool is closed")
        self._raise_if_all_dead()
        if len(self._queue) >= self.max_queue:
            raise PRMPoolFullError(
                f"PRM pool queue is full: {len(self._queue)} score calls waiting (max_queue="
                f"{self.max_queue}); retry later or add PRM actors")
        request = _Request(traces, self._loop.create_future())
        self._queue.append(request)
        self._wakeup.set()
        return await request.future

    def _bind_loop(self) -> None:
        """Start the dispatcher in the caller's event loop (again if the loop changed)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._loop = loop
        self._queue: deque[_Request] = deque()
        self._wakeup = asyncio.Event()
        self._capacity = asyncio.Event()
        self._inflight = [0] * len(self.actors)
        self._probes = {}
        self._batches: set[asyncio.Task] = set()
        self._dispatcher = loop.create_task(self._dispatch())
        for index, state in enumerate(self._state):
            if state == PROBING:  # its probe died with the previous loop
                self._probes[index] = loop.create_task(self._probe(index))

    def _raise_if_all_dead(self) -> None:
        if all(s == DEAD for s in self._state):
            raise PRMUnavailableError(f"all {len(self.actors)} PRM actors are dead")

    # -- dispatching ----------------------------------------------------------------------
    async def _dispatch(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                try:
                    index = await self._reserve_actor()
                except Exception as e:  # no actor can serve: nobody waiting may hang
                    self._fail_queue(e)
                    break
                # Let a batch fill for a moment; under load the wait for a free actor above
                # already let requests pile up.
                if sum(len(r.traces) for r in self._queue) < self.max_batch:
                    await asyncio.sleep(self.batch_delay_s)
                batch = self._take_batch()
                if not batch:  # every caller in it went away
                    self._release(index)
                    continue
                task = self._loop.create_task(self._run_batch(index, batch))
                self._batches.add(task)  # keep a reference until it is done
                task.add_done_callback(self._batches.discard)

    def _take_batch(self) -> list[_Request]:
        """Queued calls in order, up to max_batch traces (a larger call goes alone);
        calls whose caller has gone are dropped."""
        batch, size = [], 0
        while self._queue and (not batch or size + len(self._queue[0].traces) <= self.max_batch):
            request = self._queue.popleft()
            if not request.future.done():
                batch.append(request)
                size += len(request.traces)
        if batch:
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, size)
        return batch

    def _release(self, index: int) -> None:
        self._inflight[index] -= 1
        self._capacity.set()

    def _fail_queue(self, error: Exception) -> None:
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(error)

    def _least_loaded(self, exclude: int | None = None, cap: int | None = None) -> int | None:
        choices = [i for i, s in enumerate(self._state)
                   if s == ALIVE and i != exclude and (cap is None or self._inflight[i] < cap)]
        return min(choices, key=lambda i: (self._inflight[i], i)) if choices else None

    async def _reserve_actor(self) -> int:
        """A live actor with a free slot (waiting for one); its slot is taken."""
        while True:
            index = self._least_loaded(cap=self.max_inflight_per_actor)
            if index is not None:
                self._inflight[index] += 1
                return index
            await self._await_change()

    async def _await_change(self) -> None:
        """Wait until a batch finishes or a probe decides; fail if nothing can change."""
        if not any(s == ALIVE for s in self._state) and not self._probes:
            raise PRMUnavailableError(f"no live PRM actor: {self.live_actors} of "
                                      f"{len(self.actors)} not known dead, none answering")
        self._capacity.clear()
        await self._capacity.wait()

    async def _run_batch(self, index: int, batch: list[_Request]) -> None:
        traces = [t for r in batch for t in r.traces]
        try:
            scores = await self._score_with_retries(index, traces)
        except Exception as e:
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(e)
            return
        if len(scores) != len(traces):
            error = RuntimeError(f"PRM scorer returned {len(scores)} results for {len(traces)} traces")
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(error)
            return
        start = 0
        for r in batch:
            if not r.future.done():  # the caller may have been cancelled
                r.future.set_result(scores[start:start + len(r.traces)])
            start += len(r.traces)
        self.stats.requests += len(batch)
        self.stats.traces += len(traces)

    async def _score_with_retries(self, index: int, traces: list[Trace]) -> list[list[float]]:
        """Score on actor `index` (slot already reserved); on actor failure retry elsewhere."""
        ray = self._ray
        attempts = 0
        while True:
            try:
                try:
                    ref = self.actors[index].score.remote(traces)
                    return await asyncio.wait_for(_await_ref(ref), self.call_timeout_s)
                finally:
                    self._release(index)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError) as e:
                attempts += 1
                self.stats.retries += 1
                self._suspect(index)
                if attempts > self.max_task_retries:
                    raise PRMUnavailableError(
                        f"PRM batch of {len(traces)} traces failed on {attempts} attempts: {e}") from e
                index = await self._actor_for_retry(exclude=index)
                self._inflight[index] += 1

    async def _actor_for_retry(self, exclude: int) -> int:
        while True:
            index = self._least_loaded(exclude=exclude)
            if index is None:
                index = self._least_loaded()
            if index is not None:
                return index
            await self._await_change()

    # -- health ---------------------------------------------------------------------------
    def _suspect(self, index: int) -> None:
        """Stop sending to actor `index` until a probe shows it answers again (Ray may be
        restarting it); drop it if the probe fails."""
        if self._state[index] != ALIVE:
            return
        self._state[index] = PROBING
        self._probes[index] = self._loop.create_task(self._probe(index))

    async def _probe(self, index: int) -> None:
        try:
            await asyncio.wait_for(_await_ref(self.actors[index].ready.remote()), self.ready_timeout_s)
            self._state[index] = ALIVE
        except Exception:
            self._state[index] = DEAD
            self.stats.actors_lost += 1
        finally:
            self._probes.pop(index, None)
            self._capacity.set()
            self._wakeup.set()


async def _await_ref(ref):
    return await ref
