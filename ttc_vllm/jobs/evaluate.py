"""`ttc-vllm job evaluate`: batch test-time-compute evaluation, resumable.

Every (strategy, n) of a grid runs on every problem of a dataset -- testbed tiers
(tier, index) or a JSONL file of {"prompt": ..., "answer": ...} rows. One item =
(strategy, n, tier, index). Search runs in this process (the driver) over policy replicas
(Ray actors, `ttc_vllm.jobs.replicas`) and, for PRM strategies, a `PRMPool`; items are
handed to replicas from one queue, `concurrency` in flight per replica.

Resumption: each finished item is appended to OUT/results.jsonl as one line, flushed and
fsync'd before the next item is recorded, so a killed run loses only the items in flight.
A rerun with the same OUT reads the file (dropping a torn last line), skips every item
already there and runs the rest; a record made under other settings (policy, PRM, search
options, problem text) for the same key is an error, never silently mixed. One run at a
time writes to OUT (a lock file). When every item is done the run writes OUT/summary.json,
prints a table (accuracy and generated tokens per strategy x n x tier) and plots
OUT/accuracy_vs_tokens.png.

Where OUT is (`results_dir`): an absolute --out as given; a relative one against
$TTC_VLLM_JOB_STORAGE when that is set, else against the working directory -- except inside
a Ray job (`ray job submit`), whose working directory is Ray's temporary copy of
--working-dir: there a relative --out without TTC_VLLM_JOB_STORAGE is refused. The run
prints the absolute OUT first.

Stopping (`StopSignals`): SIGTERM (`ray job stop`, `kubectl delete`, `docker stop`) and
SIGINT end the run like Ctrl-C: the items in flight are dropped, every recorded one is
kept, and a line says how many are left before the engines are shut down (Ray kills a
stopped job a few seconds after SIGTERM); the exit code is 128 + the signal number.
"""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pydantic import ValidationError

from ttc_vllm.options import EXTRA_ARGS_KEY, TTCOptions
from ttc_vllm.search import STRATEGIES, SearchOptions, run_search
from ttc_vllm.testbed import task

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "accuracy_vs_tokens.png"
LOCK_FILE = ".lock"
TESTBED_POLICY = "testbed-policy"  # identity of the shipped policy in records (paths differ per machine)
TESTBED_PRM = "testbed-prm"

Key = tuple[str, int, str, int]  # (strategy, n, tier, index)


class JobError(ValueError):
    """Unusable arguments or output directory (the CLI prints one line and exits 2)."""


# -- problems and items ---------------------------------------------------------------------

@dataclass(frozen=True)
class EvalProblem:
    tier: str
    index: int
    prompt: str  # exactly the text the model continues (or the user message with --chat)
    answer: str  # expected answer, normalised like extracted answers

    @property
    def sha(self) -> str:
        return hashlib.sha256(f"{self.prompt}\0{self.answer}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Item:
    strategy: str
    n: int
    problem: EvalProblem

    @property
    def key(self) -> Key:
        return (self.strategy, self.n, self.problem.tier, self.problem.index)


def normalise_answer(answer: Any) -> str:
    return " ".join(str(answer).split())


def testbed_problems(tiers: Sequence[str], count: int, seed: int) -> list[EvalProblem]:
    """`count` problems of each tier (the testbed generator: same seed, same problems)."""
    return [EvalProblem(name, i, task.prompt(p), str(p.answer))
            for name in tiers for i, p in enumerate(task.generate(name, count, seed))]


def jsonl_problems(path: Path, name: str, limit: int | None = None) -> list[EvalProblem]:
    """Rows {"prompt": str, "answer": any} of a JSONL file (blank lines skipped), the first
    `limit` of them; the tier of every problem is `name`, the index its row number."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"cannot read dataset {path}: {e}") from None
    problems: list[EvalProblem] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise JobError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise JobError(f"{path}:{lineno}: expected an object with a non-empty string 'prompt'")
        if row.get("answer") is None or not normalise_answer(row["answer"]):
            raise JobError(f"{path}:{lineno}: missing 'answer'")
        problems.append(EvalProblem(name, len(problems), row["prompt"], normalise_answer(row["answer"])))
        if limit is not None and len(problems) == limit:
            break
    if not problems:
        raise JobError(f"dataset {path} holds no rows")
    return problems


@dataclass
class Plan:
    """What to run: the problems, the (strategy, n) grid, the search settings shared by all
    items, and the identities of policy and PRM written into every record."""

    problems: list[EvalProblem]
    strategies: list[str]
    ns: list[int]
    search: dict[str, Any]  # SearchOptions fields other than strategy and n
    policy: str = TESTBED_POLICY
    prm: str | None = TESTBED_PRM  # None: no PRM available
    testbed_answers: bool = True  # testbed answer line; else ttc_vllm.answer's generic rule
    chat: bool = False  # render prompts with the policy's chat template
    # In-engine thinking controls (TTCOptions fields: max_think, halting, ...) that every
    # engine request of every search carries; None: none.
    controls: dict[str, Any] | None = None

    def __post_init__(self):
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise JobError(f"unknown strategy {', '.join(unknown) or '(none)'}; choose from "
                           f"{', '.join(STRATEGIES)}")
        bad = [n for n in self.ns if not isinstance(n, int) or n < 1]
        if bad or not self.ns:
            raise JobError(f"n must be positive integers, got {self.ns}")
        if not self.problems:
            raise JobError("no problems to evaluate")
        self._options: dict[tuple[str, int], SearchOptions] = {}
        for strategy in self.strategies:
            for n in self.ns:
                try:
                    options = SearchOptions(strategy=strategy, n=n, **self.search)
                except ValidationError as e:
                    err = e.errors()[0]
                    where = ".".join(str(x) for x in err["loc"]) or "options"
                    raise JobError(f"{strategy} n={n}: {where}: {err['msg']}") from None
                if options.needs_scorer and self.prm is None:
                    raise JobError(f"strategy {strategy!r} needs a PRM and none is available "
                                   "(pass --prm-config, or ship the testbed PRM)")
                self._options[(strategy, n)] = options
                self._sample_controls = self._check_controls(options)

    def _check_controls(self, options: SearchOptions) -> str | None:
        if not self.controls:
            return None
        if not isinstance(self.controls, dict) or "search" in self.controls:
            raise JobError("--controls: expected an object of thinking controls (max_think, "
                           "halting, ...) without 'search' (the grid sets it)")
        try:
            ttc = TTCOptions.from_extra_args(
                {EXTRA_ARGS_KEY: {**self.controls, "search": options.model_dump(mode="json")}})
        except ValueError as e:
            raise JobError(f"--controls with {options.strategy}: {e}") from None
        return ttc.sample_controls()

    @property
    def sample_controls(self) -> str | None:
        """The controls' `extra_args["ttc"]` JSON, or None."""
        return self._sample_controls

    def options(self, strategy: str, n: int) -> SearchOptions:
        return self._options[(strategy, n)]

    @property
    def tiers(self) -> list[str]:
        return list(dict.fromkeys(p.tier for p in self.problems))

    def items(self) -> list[Item]:
        """Grouped by (strategy, n) so that items in flight together make the same kind of
        engine calls (replicas merge those)."""
        return [Item(s, n, p) for s in self.strategies for n in sorted(self.ns) for p in self.problems]

    def setup(self, item: Item) -> dict[str, Any]:
        """What a record of this item must have been made with to count as done."""
        options = self.options(item.strategy, item.n)
        return {"policy": self.policy, "prm": self.prm if options.needs_scorer else None,
                "chat": self.chat, "options": options.model_dump(mode="json"),
                "problem_sha": item.problem.sha,
                **({"controls": json.loads(self.sample_controls)} if self.sample_controls else {})}

    def extract_answer(self) -> Callable[[str], Any]:
        if self.testbed_answers:
            return task.extract_answer
        from ttc_vllm.answer import answer_extractor

        return answer_extractor()


# -- the results file -------------------------------------------------------------------------

def record_key(record: dict[str, Any]) -> Key:
    return (record["strategy"], int(record["n"]), record["tier"], int(record["index"]))


class ResultStore:
    """OUT/results.jsonl: one JSON line per finished item (see module doc).

    Opening repairs a torn last line (a run killed mid-write) by cutting the file back to
    its last newline; a malformed line elsewhere is an error. `done` maps item keys to
    their records; a key recorded twice keeps its first record.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / RESULTS_FILE
        self.done: dict[Key, dict[str, Any]] = {}
        self.repaired_bytes = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # torn last line: it was never acknowledged, drop it
            self.repaired_bytes = len(data) - end
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
            data = data[:end]
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = record_key(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise JobError(f"{self.path}:{lineno}: not a result record; the file is "
                               "corrupt (move it away to start over)") from None
            self.done.setdefault(key, record)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (one write of the whole line, then fsync)."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.directory)
        self.done.setdefault(record_key(record), record)

    def check(self, plan: Plan) -> None:
        """Raise JobError if a done item of the plan was made under other settings."""
        for item in plan.items():
            record = self.done.get(item.key)
            if record is None:
                continue
            want, have = plan.setup(item), record.get("setup", {})
            if have != want:
                fields = _differing(want, have)
                raise JobError(
                    f"{self.path} already holds {item.key} made with a different "
                    f"{', '.join(fields)}; use another --out or the settings of that run")

    def pending(self, plan: Plan) -> list[Item]:
        return [item for item in plan.items() if item.key not in self.done]


def _differing(want: dict, have: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(want) | set(have)):
        a, b = want.get(k), have.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({b!r} there, {a!r} now)")
    return out


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputLock:
    """An exclusive lock on OUT so that two runs never append to the same results file."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise JobError(f"another evaluation is writing to {self.path.parent}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# -- where results go, and stopping -----------------------------------------------------------

STORAGE_ENV = "TTC_VLLM_JOB_STORAGE"
# What `ray job submit` gives the entrypoint (ray/dashboard/modules/job/job_supervisor.py):
# {"runtime_env": ..., "metadata": {"job_submission_id": ...}}.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_job_id(environ: dict[str, str] | None = None) -> str | None:
    """The submission id when this process is a Ray job's entrypoint, else None."""
    environ = os.environ if environ is None else environ
    text = environ.get(RAY_JOB_CONFIG_ENV)
    if text is None:
        return None
    try:
        return str(json.loads(text)["metadata"]["job_submission_id"])
    except (ValueError, KeyError, TypeError):
        return "(unknown id)"


def results_dir(out: str | Path, environ: dict[str, str] | None = None,
                cwd: Path | None = None) -> Path:
    """The absolute directory the results of `--out out` go to (see module doc)."""
    environ = os.environ if environ is None else environ
    text = str(out)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", text):  # s3://b/x, gs://..., file:///...
        raise JobError(f"--out {text}: results are written as local files; give a filesystem path "
                       "(mount the bucket or volume on the node that runs the job)")
    out = Path(out).expanduser()
    if out.is_absolute():
        return out
    root = environ.get(STORAGE_ENV, "").strip()
    if root:
        if not Path(root).expanduser().is_absolute():
            raise JobError(f"{STORAGE_ENV}={root!r}: must be an absolute path (relative --out "
                           "paths are resolved against it)")
        return Path(root).expanduser() / out
    job = ray_job_id(environ)
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if job is not None:
        where = ("Ray's temporary copy of --working-dir, which Ray deletes once unused"
                 if "runtime_resources" in cwd.parts else "a directory Ray chose")
        raise JobError(
            f"--out {text} is relative, and this runs as Ray job {job} whose working directory "
            f"({cwd}) is {where}. Give an absolute path on the node that runs the job (a "
            f"mounted volume, e.g. --out /mnt/results/{text}), or set {STORAGE_ENV} to a "
            "directory that relative --out paths are resolved against (ray job submit "
            f"--runtime-env-json '{{\"env_vars\": {{\"{STORAGE_ENV}\": \"/mnt/results\"}}}}')")
    return cwd / out


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


# -- running ----------------------------------------------------------------------------------

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


# -- summary, table, plot ---------------------------------------------------------------------

def summarize(plan: Plan, done: dict[Key, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (strategy, n, tier) of the plan over its recorded items: accuracy and
    mean tokens per problem."""
    rows = []
    for strategy in plan.strategies:
        for n in sorted(plan.ns):
            for tier in plan.tiers:
                keys = [(strategy, n, p.tier, p.index) for p in plan.problems if p.tier == tier]
                records = [done[k] for k in keys if k in done]
                count = len(records)

                def mean(field: str) -> float:
                    return sum(r[field] for r in records) / count if count else 0.0

                rows.append({
                    "strategy": strategy, "n": n, "tier": tier, "problems": len(keys),
                    "done": count, "correct": sum(bool(r["correct"]) for r in records),
                    "accuracy": sum(bool(r["correct"]) for r in records) / count if count else 0.0,
                    "generated_tokens_per_problem": mean("generated_tokens"),
                    "prm_tokens_per_problem": mean("prm_tokens"),
                    "wall_s_per_problem": mean("wall_time_s"),
                })
    return rows


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    head = (f"{'strategy':<14}{'n':>4}  {'tier':<10}{'done':>9}{'accuracy':>10}"
            f"{'gen tok/prob':>14}{'prm tok/prob':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['strategy']:<14}{r['n']:>4}  {r['tier']:<10}"
                     f"{str(r['done']) + '/' + str(r['problems']):>9}{r['accuracy']:>10.1%}"
                     f"{r['generated_tokens_per_problem']:>14.1f}{r['prm_tokens_per_problem']:>14.1f}")
    return "\n".join(lines)


def plot_accuracy_vs_tokens(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against generated tokens per problem: one line per (strategy, tier) over n;
    colour = tier, marker = strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = list(dict.fromkeys(r["tier"] for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>ph*"
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for ti, tier in enumerate(tiers):
        for si, strategy in enumerate(strategies):
            pts = sorted((r["n"], r["generated_tokens_per_problem"], 100 * r["accuracy"])
                         for r in rows if r["tier"] == tier and r["strategy"] == strategy and r["done"])
            if not pts:
                continue
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker=markers[si % len(markers)],
                    color=colours[ti % len(colours)], linestyle=["-", "--", ":", "-."][si % 4],
                    label=f"{tier} / {strategy} (n={','.join(str(p[0]) for p in pts)})")
    if any(r["generated_tokens_per_problem"] > 0 for r in rows):
        ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem (log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(plan: Plan, store: ResultStore, extra: dict[str, Any]) -> dict[str, Any]:
    rows = summarize(plan, store.done)
    record = {**extra, "strategies": plan.strategies, "n": sorted(plan.ns), "tiers": plan.tiers,
              "policy": plan.policy, "prm": plan.prm, "search": plan.search, "rows": rows}
    path = store.directory / SUMMARY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    plot_accuracy_vs_tokens(rows, store.directory / PLOT_FILE,
                            f"accuracy vs compute ({len(plan.problems)} problems)")
    return record


# -- the CLI job ------------------------------------------------------------------------------

_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r"}


def parse_delimiter(text: str | None) -> str | None:
    """--step-delimiter with \\n, \\t, \\r escapes ("\\n\\n" -> two newlines)."""
    if text is None:
        return None
    for escape, char in _ESCAPES.items():
        text = text.replace(escape, char)
    return text


def prm_config_from(source: str | None):
    """(identity, PRMConfig) of --prm-config (JSON text or a file), or of the shipped testbed
    PRM; (None, None) when there is none."""
    from ttc_vllm.prm.scorers import PRMConfig
    from ttc_vllm.testbed import prm_recipe_path

    if source is None:
        if not (prm_recipe_path() / "config.json").exists():
            return None, None
        return TESTBED_PRM, PRMConfig.testbed()
    try:
        text = source if source.lstrip().startswith("{") else Path(source).read_text()
        config = PRMConfig.model_validate(json.loads(text))
    except OSError as e:
        raise JobError(f"--prm-config: cannot read {source}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise JobError(f"--prm-config: not JSON ({e.msg})") from None
    except ValidationError as e:
        err = e.errors()[0]
        raise JobError(f"--prm-config: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    identity = json.dumps(config.model_dump(mode="json", exclude={"engine_kwargs"}), sort_keys=True)
    return identity, config


def plan_from_args(args) -> tuple[Plan, Any]:
    """The Plan and PRMConfig (or None) of parsed `job evaluate` arguments."""
    if args.dataset is not None:
        if args.tiers is not None:
            raise JobError("give either --tiers or --dataset, not both")
        problems = jsonl_problems(args.dataset, args.dataset_name or args.dataset.stem, args.problems)
    else:
        problems = testbed_problems(args.tiers or list(task.TIERS), args.problems or 100, args.seed)
    search = {"temperature": args.temperature, "max_steps": args.max_steps,
              "max_step_tokens": args.max_step_tokens, "beam_width": args.beam_width,
              "aggregation": args.aggregation}
    delimiter = parse_delimiter(args.step_delimiter)
    if delimiter is not None:
        search["step_delimiter"] = delimiter
    adaptive = json_object_arg("--adaptive", getattr(args, "adaptive", None), "search.adaptive options")
    if adaptive is not None:
        search["adaptive"] = adaptive
    needs_prm = any(s != "majority" for s in args.strategies)
    prm_identity, prm_config = prm_config_from(args.prm_config) if needs_prm else (None, None)
    plan = Plan(problems, args.strategies, args.n, search, policy=args.policy or TESTBED_POLICY,
                prm=prm_identity, testbed_answers=args.dataset is None, chat=args.chat,
                controls=json_object_arg("--controls", args.controls, "ttc thinking controls"))
    return plan, prm_config


def json_object_arg(flag: str, text: str | None, what: str) -> dict[str, Any] | None:
    """A command-line JSON object (None when not given); JobError naming the flag."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise JobError(f"{flag}: not valid JSON ({e.msg} at {e.pos})") from None
    if not isinstance(value, dict):
        raise JobError(f"{flag}: expected a JSON object of {what}, got {type(value).__name__}")
    return value


def _engine_overrides(args) -> dict[str, Any]:
    return json_object_arg("--engine-kwargs", args.engine_kwargs, "vllm.LLM arguments") or {}


class _Progress:
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


def evaluate_main(args, argv: Sequence[str] | None = None) -> int:
    """Run `ttc-vllm job evaluate` (parsed arguments from ttc_vllm.cli). Raises JobError or
    replicas.ReplicaUnavailableError for bad arguments or an unusable cluster (the CLI makes
    them one line and exit 2). A stop signal or Ctrl-C keeps every recorded item and returns
    128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
    from ttc_vllm.jobs import replicas as rp

    out = results_dir(args.out)
    plan, prm_config = plan_from_args(args)
    overrides = _engine_overrides(args)
    try:
        address = rp.resolve_address(args.address)
    except ValueError as e:
        raise JobError(str(e)) from None
    rp.check_reachable(address)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"--out {args.out}: cannot create {out}: {e.strerror or e}") from None
    print(f"results: {out} (rerun with the same --out to resume)", flush=True)
    started = time.time()
    with OutputLock(out), StopSignals() as stop:
        store = ResultStore(out)
        store.check(plan)
        pending = store.pending(plan)
        total = len(plan.items())
        before = total - len(pending)
        print(f"{total} items ({len(plan.strategies)} strategies x {len(plan.ns)} n x "
              f"{len(plan.problems)} problems): {before} already in {store.path}, "
              f"{len(pending)} to run", flush=True)
        if store.repaired_bytes:
            print(f"dropped a torn last line ({store.repaired_bytes} bytes) of {store.path}")
        if pending:
            said = []

            def say_stopped() -> None:
                if not said:
                    said.append(True)
                    left = len(store.pending(plan))
                    print(f"stopped ({stop.name}): {total - left} of {total} items done, {left} left; "
                          "rerun the same command to resume", file=sys.stderr, flush=True)

            try:
                _run_on_ray(args, plan, prm_config, overrides, address, store, pending,
                            _Progress(total, before), stop, say_stopped)
            except KeyboardInterrupt:
                say_stopped()
                return 128 + (stop.signum or signal.SIGINT)
            except ItemFailedError as e:
                left = len(store.pending(plan))
                print(f"error: {e}\n{total - left} of {total} items done, {left} left; rerun the "
                      "same command to resume", file=sys.stderr, flush=True)
                return 1
        summary = write_summary(plan, store, {
            "command": "ttc-vllm " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "items": total, "recorded_before_this_run": before,
            "this_run_seconds": round(time.time() - started, 1)})
    print(format_table(summary["rows"]))
    print(f"wrote {out / SUMMARY_FILE}, {out / PLOT_FILE} and {store.path}")
    return 0


def _run_on_ray(args, plan: Plan, prm_config, overrides, address: str, store: ResultStore,
                pending: list[Item], progress: _Progress, stop: StopSignals,
                on_stop: Callable[[], None]) -> None:
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
                functools.partial(rp.vllm_policy, args.policy, overrides, parse_delimiter(args.step_delimiter)),
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
