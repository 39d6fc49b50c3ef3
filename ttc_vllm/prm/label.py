"""Monte-Carlo step labels for PRM training (Math-Shepherd style).

For sampled traces of training problems, the label of step k is the fraction of rollouts
from the prefix (prompt + steps 0..k) that reach the right answer. Two generator rounds,
each ONE call: (1) `traces_per_problem` full traces per problem, (2) `rollouts` completions
of every distinct step prefix. Prompts are token ids, so with prefix caching the rollouts of
a prefix share its KV blocks and only the new tokens are computed. The final (answer) step
needs no rollouts: its label is whether the answer is right.

The trace's own continuation after step k is itself a policy sample from that prefix, so by
default it counts as one more rollout (label = (wins + trace correct) / (rollouts + 1)). With
`rollouts=0` there is no second round at all: every step is labelled by its trace's outcome
(a 1-rollout estimate) -- noisy per step, but right in expectation and ~100x cheaper, so a
PRM can see many more traces (and mistakes) for the same compute.

Generic over the task (`LabelTask`); the testbed's task and the `ttc-vllm job prm-data`
entry point on the testbed policy are in `ttc_vllm.testbed.prm_data`.

Output: JSONL, one row per (trace, step):
  problem, trace_id, step_index, num_steps, prompt_token_ids, step_token_ids (steps 0..k),
  step_text, final, mc_value, correct_rollouts, rollouts (own continuation included),
  trace_correct,
  exact_prefix_correct (null unless the task can check a prefix exactly; the testbed can:
  every step so far is right arithmetic on its own terms -- ground truth for AUC).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

from ttc_vllm.search.protocols import Completion, StepGenerator, StepParams


class LabelTask(Protocol):
    """What the labeller needs to know about a task's problems."""

    def prompt_ids(self, problem: Any) -> list[int]: ...

    def is_correct(self, problem: Any, completion_text: str) -> bool: ...

    def record(self, problem: Any) -> dict[str, Any]:
        """The problem as JSON (written on every row)."""
        ...

    def exact_prefix_correct(self, problem: Any, step_texts: Sequence[str]) -> bool | None:
        """Ground truth of a prefix when the task can check steps exactly; else None."""
        ...


async def mc_label(generator: StepGenerator, task: LabelTask, problems: Sequence[Any],
                   traces_per_problem: int, rollouts: int, params: StepParams,
                   stats: dict[str, Any] | None = None,
                   count_own_continuation: bool = True) -> list[dict[str, Any]]:
    """Label every step of `traces_per_problem` sampled traces per problem (see module doc).
    Traces cut by `params.max_tokens` before finishing are dropped (counted in stats)."""
    if traces_per_problem < 1:
        raise ValueError(f"traces_per_problem must be >= 1, got {traces_per_problem}")
    if rollouts < 0 or (rollouts == 0 and not count_own_continuation):
        raise ValueError(f"rollouts must be >= 1 (>= 0 when the trace's own continuation "
                         f"counts), got {rollouts}")
    stats = stats if stats is not None else {}
    prompts = [tuple(task.prompt_ids(p)) for p in problems]
    t0 = time.perf_counter()
    sampled = await generator.complete(prompts, traces_per_problem, params)
    stats["sample_seconds"] = round(time.perf_counter() - t0, 2)

    traces: list[tuple[int, Completion]] = []  # (problem index, steps)
    dropped = 0
    for i, samples in enumerate(sampled):
        for steps in samples:
            if steps and steps[-1].finished:
                traces.append((i, steps))
            else:
                dropped += 1

    # Every distinct non-final step prefix, rolled out once: prefix -> problem index.
    problem_of_prefix: dict[tuple[int, ...], int] = {}
    for i, steps in traces:
        ids = list(prompts[i])
        for step in steps[:-1]:
            ids.extend(step.token_ids)
            problem_of_prefix.setdefault(tuple(ids), i)
    prefixes = list(problem_of_prefix)
    row_of_prefix = {p: j for j, p in enumerate(prefixes)}

    t0 = time.perf_counter()
    outs = await generator.complete(prefixes, rollouts, params) if prefixes and rollouts else []
    stats["rollout_seconds"] = round(time.perf_counter() - t0, 2)
    wins = [0] * len(prefixes)
    for j, (prefix, samples) in enumerate(zip(prefixes, outs)):
        problem = problems[problem_of_prefix[prefix]]
        wins[j] = sum(task.is_correct(problem, "".join(s.text for s in c)) for c in samples)
    own = int(count_own_continuation)

    rows = []
    for trace_id, (i, steps) in enumerate(traces):
        problem = problems[i]
        texts = [s.text for s in steps]
        trace_correct = task.is_correct(problem, "".join(texts))
        ids = list(prompts[i])
        for k, step in enumerate(steps):
            ids.extend(step.token_ids)
            final = k == len(steps) - 1
            if final:
                correct, n = int(trace_correct), 1
            else:
                correct = wins[row_of_prefix[tuple(ids)]] + own * int(trace_correct)
                n = rollouts + own
            rows.append({
                "problem": task.record(problem),
                "trace_id": trace_id,
                "step_index": k,
                "num_steps": len(steps),
                "prompt_token_ids": list(prompts[i]),
                "step_token_ids": [list(s.token_ids) for s in steps[: k + 1]],
                "step_text": step.text,
                "final": final,
                "mc_value": correct / n,
                "correct_rollouts": correct,
                "rollouts": n,
                "trace_correct": trace_correct,
                "exact_prefix_correct": task.exact_prefix_correct(problem, texts[: k + 1]),
            })
    stats.update(problems=len(problems), traces=len(traces), dropped_traces=dropped,
                 prefixes=len(prefixes) if rollouts else 0, rows=len(rows))
    return rows


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    nonfinal = [r for r in rows if not r["final"]]
    exact = [r for r in rows if r["exact_prefix_correct"] is not None]
    traces = {r["trace_id"]: r["trace_correct"] for r in rows}
    return {
        "rows": len(rows),
        "traces": len(traces),
        "trace_accuracy": round(sum(traces.values()) / max(1, len(traces)), 4),
        "mean_mc_value_nonfinal": round(sum(r["mc_value"] for r in nonfinal) / max(1, len(nonfinal)), 4),
        "exact_prefix_correct_share": round(sum(bool(r["exact_prefix_correct"]) for r in exact)
                                            / max(1, len(exact)), 4),
    }
