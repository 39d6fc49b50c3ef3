"""`ttc-vllm job evaluate`: batch test-time-compute evaluation, resumable.

Every (strategy, n) of a grid runs on every problem of a dataset -- testbed tiers
(tier, index) or a JSONL file of {"prompt": ..., "answer": ...} rows (`problems`). One item =
(strategy, n, tier, index) (`plan`). Search runs in this process (the driver) over policy
replicas (Ray actors, `replicas`) and, for PRM strategies, a `PRMPool`; items are handed to
replicas from one queue, `concurrency` in flight per replica (`run`).

Each finished item is appended to OUT/results.jsonl at once, so a rerun with the same OUT
resumes where a killed one stopped (`store`: where OUT is, the results file, its lock). The
run prints the absolute OUT first. When every item is done the run writes OUT/summary.json,
prints a table (accuracy and generated tokens per strategy x n x tier) and plots
OUT/accuracy_vs_tokens.png (`report`).

A stop signal (SIGTERM, SIGINT) keeps every recorded item; the exit code is 128 + the signal
number (`run.StopSignals`).
"""
from __future__ import annotations

import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from ttc_vllm.jobs.errors import JobError
from ttc_vllm.jobs.plan import TESTBED_POLICY, TESTBED_PRM, Plan
from ttc_vllm.jobs.problems import jsonl_problems, testbed_problems
from ttc_vllm.jobs.report import PLOT_FILE, SUMMARY_FILE, format_table, write_summary
from ttc_vllm.jobs.run import ItemFailedError, Progress, StopSignals, run_on_ray
from ttc_vllm.jobs.store import OutputLock, ResultStore, results_dir
from ttc_vllm.testbed import task


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
                run_on_ray(args, plan, prm_config, overrides, address, store, pending,
                           Progress(total, before), stop, say_stopped)
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


# -- the arguments --------------------------------------------------------------------------

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


def prm_config_from(source: str | None):
    """(identity, PRMConfig) of --prm-config (JSON text or a file), or of the shipped testbed
    PRM; (None, None) when there is none."""
    from ttc_vllm.prm.scorers import PRMConfig
    from ttc_vllm.testbed import prm_recipe_path, prm_scorer_config

    if source is None:
        if not (prm_recipe_path() / "config.json").exists():
            return None, None
        return TESTBED_PRM, prm_scorer_config()
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


_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r"}


def parse_delimiter(text: str | None) -> str | None:
    """--step-delimiter with \\n, \\t, \\r escapes ("\\n\\n" -> two newlines)."""
    if text is None:
        return None
    for escape, char in _ESCAPES.items():
        text = text.replace(escape, char)
    return text


def _engine_overrides(args) -> dict[str, Any]:
    return json_object_arg("--engine-kwargs", args.engine_kwargs, "vllm.LLM arguments") or {}
